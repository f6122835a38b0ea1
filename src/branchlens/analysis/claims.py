"""The paper's claims, each against our number: supported, not supported, or explained by scale.

Bozoukov (2025) makes four claims by eye (see shared/reference/paper.md). Each gets one row:
the measurement, its interval or p-value, and a verdict with the rule that produced it, so a
reader can disagree with the rule but not with the numbers. Verdicts:
``supported`` · ``not supported`` · ``explained by channel scale`` (holds on the raw decoder,
gone once activation scale is controlled) · ``not testable`` (too little data to say).
"""

from __future__ import annotations

from typing import Any

MIN_PAIRS = 10  # matched cross-layer pairs needed before agreement means anything
MIN_LATENTS = 5  # dominant latents in a branch before its category test counts
PAPER_CURVE_LAYER, PAPER_CURVE_BRANCH = "mixed4c", "5x5"


def _claim(cid: str, claim: str, verdict: str, evidence: str, rule: str,
           **numbers: Any) -> dict[str, Any]:
    return {"id": cid, "claim": claim, "verdict": verdict, "evidence": evidence, "rule": rule,
            "numbers": numbers}


def specialisation(per_layer: dict[str, dict], q: float) -> dict:
    """Claim 1: SAE latents specialise by branch (robust discoveries beyond both controls)."""
    rows = {}
    for layer, s in per_layer.items():
        ctl = max((c["significant"] for k, c in s.get("null_controls", {}).items()
                   if not c.get("reference_only")), default=0)
        raw = sum(r["significant"] for r in s["branches"])
        robust = sum(r["robust"] for r in s["branches"])
        rows[layer] = {"tested": s["tested"], "raw": raw, "robust": robust,
                       "max_null_control": ctl}
    sup = [la for la, r in rows.items() if r["robust"] >= max(10, 2 * r["max_null_control"])]
    scale = [la for la, r in rows.items() if la not in sup and r["raw"] >= 10
             and r["robust"] < 0.2 * r["raw"]]
    verdict = ("supported" if sup else "explained by channel scale" if scale
               else "not supported")
    ev = "; ".join(f"{la}: {r['robust']} robust / {r['raw']} raw (latent, branch) discoveries "
                   f"among {r['tested']} tested latents (null controls ≤ "
                   f"{r['max_null_control']})" for la, r in rows.items())
    return _claim("specialise", "SAE latents of mixed4a–4e specialise by branch", verdict, ev,
                  f"supported where robust (latent, branch) discoveries at BH q={q} reach "
                  "max(10, 2× the largest null-control count)", per_layer=rows,
                  supported_layers=sup)


def five_by_five(per_layer: dict[str, dict]) -> dict:
    """Claim 2: specialised latents sit mostly in the 5x5 branch (relative to its width)."""
    rows, raw_top, robust_top = {}, [], []
    for layer, s in per_layer.items():
        tested = max(s["tested"], 1)
        enr = {r["branch"]: (r["robust_dominant"] / tested / r["channel_share"],
                             r["dominant"] / tested / r["channel_share"]) for r in s["branches"]}
        rows[layer] = {b: {"robust_dominant_per_channel_share": e[0],
                           "dominant_per_channel_share": e[1]} for b, e in enr.items()}
        if "5x5" in enr and max(enr.values(), key=lambda e: e[1]) == enr["5x5"] and enr["5x5"][1]:
            raw_top.append(layer)
        if "5x5" in enr and max(enr.values(), key=lambda e: e[0]) == enr["5x5"] and enr["5x5"][0]:
            robust_top.append(layer)
    half = len(per_layer) / 2
    verdict = ("supported" if len(robust_top) > half
               else "explained by channel scale" if len(raw_top) > half
               else "not supported")
    ev = (f"5x5 has the most robust-dominant latents per channel share in {len(robust_top)} of "
          f"{len(per_layer)} layers ({', '.join(robust_top) or 'none'}); on the raw rule alone "
          f"in {len(raw_top)} ({', '.join(raw_top) or 'none'})")
    return _claim("five_by_five", "Specialisation is mostly in the 5x5 branch", verdict, ev,
                  "supported when 5x5 leads (robust-dominant latents / channel share) in most "
                  "layers", per_layer=rows)


def animals(per_layer: dict[str, dict]) -> dict:
    """Claim 3: 5x5 latents are animal features (vs the images' own animal base rate)."""
    rows, sup, raw_only, testable = {}, [], [], []
    for layer, s in per_layer.items():
        ct = s.get("category_test", {})
        rob = ct.get("robust_dominant", {}).get("5x5", {})
        dom = ct.get("dominant", {}).get("5x5", {})
        rows[layer] = {"robust": rob, "raw": dom}
        if (rob.get("latents") or 0) >= MIN_LATENTS:
            testable.append(layer)
            if rob.get("significant") and rob["difference"] > 0:
                sup.append(layer)
        if (dom.get("latents") or 0) >= MIN_LATENTS and dom.get("significant") \
                and dom["difference"] > 0 and layer not in sup:
            raw_only.append(layer)
    half = len(per_layer) / 2
    if len(sup) > half:
        verdict = "supported"
    elif len(raw_only) + len(sup) > half:
        verdict = "explained by channel scale"
    elif not testable and not raw_only:
        verdict = "not testable"
    else:
        verdict = "not supported"

    def fmt(layer: str) -> str:
        r = rows[layer]["robust"]
        if not r.get("latents"):
            return f"{layer}: no robust 5x5 latents"
        return (f"{layer}: {r['latents']} latents, animal {r['animal_fraction']:.2f} vs base "
                f"{r['base_rate']:.2f} (Δ 95% CI [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], "
                f"q={r.get('q_value_layers_x_branches', float('nan')):.2g})")

    return _claim("animals", "5x5 latents are animal features", verdict,
                  "; ".join(fmt(la) for la in per_layer),
                  "animal fraction of held-out top images of robust 5x5 latents vs the animal "
                  "fraction of the held-out images; image-cluster bootstrap, BH over layers × "
                  "branches; supported when significant and positive in most layers",
                  per_layer=rows)


def across_layers(cross: list[dict]) -> dict:
    """Claim 4: similar features sit in the same branch across layers (matched pairs agree)."""
    rows, sup, testable = {}, [], []
    for c in cross:
        cc = c.get("consistency")
        key = "↔".join(c["layers"])
        if cc is None:
            rows[key] = {"skipped": c.get("skipped")}
            continue
        n = cc["pairs_both_dominant"]
        vs = cc.get("vs_shifted_image_matching") or {}
        rows[key] = {"pairs": n, "agreement": cc["agreement"], "null_mean": cc["null_mean"],
                     "kappa": cc["kappa"], "p_value": cc["p_value"],
                     "shifted_null_agreement": vs.get("null_agreement"),
                     "p_value_vs_shifted": vs.get("p_value"),
                     "shifted_null_pairs": c["shifted_image_null"][
                         "pairs_above_threshold_per_replicate"]}
        if n >= MIN_PAIRS:
            testable.append(key)
            p2 = rows[key]["p_value_vs_shifted"]
            if cc["p_value"] < 0.05 and cc["kappa"] > 0 and (p2 is None or p2 < 0.05):
                sup.append(key)
    if not testable:
        verdict = "not testable"
    else:
        verdict = "supported" if len(sup) > len(testable) / 2 else "not supported"
    ev = "; ".join(
        f"{k}: {r['pairs']} pairs, agreement {r['agreement']:.2f} vs {r['null_mean']:.2f}, "
        f"κ {r['kappa']:.2f}, p {r['p_value']:.2g}" if "pairs" in r and r["pairs"]
        else f"{k}: {r.get('pairs', 0) if 'pairs' in r else r.get('skipped')} pairs"
        for k, r in rows.items())
    return _claim("across_layers",
                  "Similar features sit in branches of the same kernel size across layers",
                  verdict, ev or "no layer pairs",
                  f"mutual-best matches above the shifted-image null's 99th percentile; "
                  f"supported when agreement beats both the shuffled matching (p<0.05, κ>0) and "
                  f"the matching on shifted images (Fisher p<0.05) in most pairs with "
                  f"≥{MIN_PAIRS} pairs", per_pair=rows)


def paper_curve(per_layer: dict[str, dict]) -> dict:
    """Claim 5: the mixed4c 5x5 sorted-ratio curve's upper tail is specialisation."""
    layer = PAPER_CURVE_LAYER if PAPER_CURVE_LAYER in per_layer else None
    if layer is None:
        return _claim("paper_curve", "mixed4c 5x5: the upper tail of the sorted ratio curve is "
                      "specialisation", "not testable", "mixed4c was not analysed", "")
    pc = per_layer[layer]["paper_curve"]
    raw, std = pc["raw"][PAPER_CURVE_BRANCH], pc["std"][PAPER_CURVE_BRANCH]
    beats_raw = raw["p_count_gt_0.9"] < 0.05 and raw["count_gt_0.9"] > raw["null_count_gt_0.9_q95"]
    beats_std = std["p_count_gt_0.9"] < 0.05 and std["count_gt_0.9"] > std["null_count_gt_0.9_q95"]
    verdict = ("supported" if beats_raw and beats_std else
               "explained by channel scale" if beats_raw else "not supported")
    ev = (f"ratio > 0.9: {raw['count_gt_0.9']} latents (null {raw['null_count_gt_0.9_mean']:.1f}, "
          f"95% ≤ {raw['null_count_gt_0.9_q95']:.0f}, p={raw['p_count_gt_0.9']:.3g}); "
          f"std-scaled {std['count_gt_0.9']} (null {std['null_count_gt_0.9_mean']:.1f}, "
          f"p={std['p_count_gt_0.9']:.3g}); median {raw['median']:.3f} vs null "
          f"{raw['null_median_mean']:.3f} (isotropic √(w/d) {raw['isotropic_ratio']:.3f})")
    return _claim("paper_curve", "mixed4c 5x5: the upper tail of the sorted ratio curve is "
                  "specialisation", verdict, ev,
                  f"count of ratio > 0.9 vs {pc['replicates']} channel-permutation replicates, "
                  "on raw and std-scaled decoders", raw=raw, std=std)


def paper_claims(per_layer: dict[str, dict], cross: list[dict], q: float = 0.05) -> list[dict]:
    """Every claim of the paper, in the order the paper makes them."""
    if not per_layer:
        return []
    return [specialisation(per_layer, q), five_by_five(per_layer), animals(per_layer),
            across_layers(cross), paper_curve(per_layer)]
