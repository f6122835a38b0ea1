"""``analyze(run_dir)``: every statistic for every trained layer, written to ``RUN/analysis/``.

Consumes the store (``RUN/store``) and SAEs (``RUN/sae/<layer>``) through the CONTRACTS API and
writes ``summary.json`` (every number), ``latents.csv`` (one row per latent of every layer),
``layers.csv`` (layer × branch) and PNG/SVG figures.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from branchlens.analysis import activity as act
from branchlens.analysis import categories as cat
from branchlens.analysis.branches import (
    NONE,
    BranchTest,
    analyze_branches,
    layer_table,
    null_band,
    permutation_pvalues,
    scaled_decoder,
)
from branchlens.analysis.crosslayer import align_rows, best_matches, consistency
from branchlens.analysis.embedding import embed_latents, knn_branch_agreement
from branchlens.analysis.figures import embedding_plot, sorted_ratio_curves
from branchlens.analysis.stats import bh_reject
from branchlens.artifacts import atomic_path, provenance, write_json
from branchlens.variants import BLOCK_NAMES, branch_slices

PVALUE_NOTE = ("p-values are per latent; latents are not independent (they share images and "
               "directions), so BH counts and per-latent p-values are approximate. Permutation "
               "tests that shuffle the matching or branch labels keep that dependence.")


@dataclass
class AnalysisConfig:
    q: float = 0.05  # BH false discovery rate, per branch across latents
    scale: str = "dict"  # decision scale: dict (channel RMS over latents) | std | raw
    n_perm: int = 2000  # channel permutations per latent
    refine_to: int = 20000  # permutations for latents with tiny p (resolution for BH)
    top: int = 64  # top-activating vectors kept per latent
    top_images: int = 16  # distinct top images per latent for categories
    attribution_top: int = 16  # top vectors for the data-side branch attribution
    min_images: int = 20  # distinct firing images needed to take part in matching
    match_threshold: float = 0.5  # correlation for a cross-layer pair
    knn_k: int = 10
    embed: str = "auto"  # auto | umap | pca | none
    null_band_reps: int = 20
    animal_group_min: float = 0.5  # highlighted group: ≥ this animal fraction of top images
    batch_size: int = 4096
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto: SAE encoding, permutations and kNN


def _layer_order(name: str) -> tuple[int, str]:
    block = name.split("_")[0]
    return (BLOCK_NAMES.index(block) if block in BLOCK_NAMES else 99, name)


def find_layers(run_dir: Path) -> list[str]:
    """Layers with a trained SAE under ``RUN/sae``, in forward order."""
    sae_dir = run_dir / "sae"
    if not sae_dir.is_dir():
        return []
    names = [p.name for p in sae_dir.iterdir() if (p / "cfg.json").is_file()]
    return sorted(names, key=_layer_order)


def _labels(store) -> np.ndarray:
    return np.array([(-1 if im.get("label") is None else int(im["label"]))
                     for im in store.images], dtype=np.int64)


def _fmt(x: Any) -> Any:
    if isinstance(x, float | np.floating):
        return "" if np.isnan(x) else f"{float(x):.6g}"
    return x


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def _beta_vs_mc(bt: BranchTest, n_perm: int) -> dict:
    """How well the moment-matched Beta tracks Monte-Carlo where MC resolves p (p ≥ 20/B)."""
    ok = np.isfinite(bt.p_perm) & (bt.p_perm >= 20 / n_perm) & np.isfinite(bt.p_beta)
    if not ok.any():
        return {"n": 0}
    d = np.abs(np.log10(np.maximum(bt.p_beta[ok], 1e-300)) - np.log10(bt.p_perm[ok]))
    return {"n": int(ok.sum()), "median_abs_log10_diff": float(np.median(d)),
            "q90_abs_log10_diff": float(np.quantile(d, 0.9))}


def analyze_layer(layer: str, sae, store, cfg: AnalysisConfig, out_dir: Path,
                  log: Callable[[str], None]) -> dict:
    """All per-latent and per-layer statistics of one layer; returns summary + columns."""
    t0 = time.time()
    variant = sae.cfg.variant or store.manifest.get("variant")
    slices = branch_slices(variant, layer)
    if sae.cfg.branch_slices:
        given = {b: [s.start, s.stop] for b, s in slices.items()}
        if {b: list(v) for b, v in sae.cfg.branch_slices.items()} != given:
            raise ValueError(f"{layer}: SAE branch slices {sae.cfg.branch_slices} != variant "
                             f"{given}")
    branches = list(slices)
    dec = sae.decoder_directions().float().cpu().numpy()
    n, d = dec.shape
    std = np.asarray(store.layer_stats(layer)["std"], dtype=np.float64)
    log(f"{layer}: {n} latents × {d} channels — branch tests")
    bt = analyze_branches(dec, slices, std=std, scale=cfg.scale, q=cfg.q, n_perm=cfg.n_perm,
                          refine_to=cfg.refine_to, seed=cfg.seed, device=cfg.device)
    # Sanity control: one channel permutation for all latents destroys branch structure.
    rng = np.random.default_rng(cfg.seed + 1)
    perm = rng.permutation(d)
    ctrl = permutation_pvalues(scaled_decoder(dec, cfg.scale, std)[:, perm], slices,
                               n_perm=cfg.n_perm, refine_to=cfg.refine_to, seed=cfg.seed + 2,
                               device=cfg.device)
    ctrl_rej, _ = bh_reject(ctrl.p, cfg.q)
    # Scale control of the scale control: random raw directions divided by the same std show
    # how many discoveries the normalisation alone creates (quiet branches get inflated).
    iso = rng.standard_normal(dec.shape) / np.where(std > 0, std, 1.0)
    iso_ctrl = permutation_pvalues(iso, slices, n_perm=cfg.n_perm, refine_to=cfg.refine_to,
                                   seed=cfg.seed + 3, device=cfg.device)
    iso_rej, _ = bh_reject(iso_ctrl.p, cfg.q)

    log(f"{layer}: activity pass over {store.count(layer)} stored vectors")
    arr = store.array(layer)
    prov = np.asarray(store.provenance(layer))
    img = prov[:, 0].astype(np.int64)
    with torch.no_grad():
        a = act.latent_activity(sae.encode, arr, img, n, top=cfg.top,
                                batch_size=cfg.batch_size, n_images=len(store.images),
                                device=cfg.device)
        attr = act.branch_attribution(sae._center, sae.W_enc.detach().float(), arr, a.top_row,
                                      slices, n_top=cfg.attribution_top)
    alive = a.fire_count > 0
    dead_train = (sae.dead_mask().cpu().numpy() if hasattr(sae, "dead_mask")
                  else np.zeros(n, bool))
    labels = _labels(store)
    tops = act.top_images(a.top_row, img, cfg.top_images)
    fracs = [cat.category_fractions([labels[i] for i in t if labels[i] >= 0]) for t in tops]
    animal = np.array([f.get("animal", np.nan) for f in fracs])
    dog = np.array([f.get("dog", np.nan) for f in fracs])
    top_cat = [max(cat.CATEGORIES, key=lambda c, f=f: f[c]) if f else "" for f in fracs]

    log(f"{layer}: figures, kNN, embedding")
    band = null_band(dec, slices, positive=True, n_rep=cfg.null_band_reps, seed=cfg.seed)
    groups = {"animal top images": np.nan_to_num(animal) >= cfg.animal_group_min,
              "dog top images": np.nan_to_num(dog) >= cfg.animal_group_min}
    figs = sorted_ratio_curves(bt.paper_ratio, band, branches, bt.widths,
                               out_dir / f"ratio_curves_{layer}",
                               f"{layer}: sorted paper ratio per branch, channel-permutation "
                               f"null 5–95 % (grey)", groups)
    knn = knn_branch_agreement(dec, bt.dominant, k=cfg.knn_k, seed=cfg.seed, device=cfg.device)
    emb = {"method": "none"}
    if cfg.embed != "none":
        coords, method, note = embed_latents(dec, cfg.embed, seed=cfg.seed)
        figs += embedding_plot(coords, bt.dominant, branches, out_dir / f"embedding_{layer}",
                               f"{layer}: {n} latents ({method}, cosine on unit decoder rows), "
                               "coloured by dominant branch")
        emb = {"method": method, "note": note, "n_points": int(coords.shape[0])}
        np.save(out_dir / f"embedding_{layer}.npy", coords)

    table = layer_table(bt, alive)
    for row, b in zip(table, range(len(branches)), strict=True):
        row["layer"] = layer
        row["permuted_channels_control_significant"] = int(ctrl_rej[:, b].sum())
        row["std_normalised_random_control_significant"] = int(iso_rej[:, b].sum())
        m = bt.dominant == b
        row["mean_attribution_of_dominant"] = (float(np.nanmean(attr[m, b]))
                                               if m.any() else None)
    summary = {
        "layer": layer, "variant": variant, "latents": n, "channels": d,
        "branch_slices": {b: [s.start, s.stop] for b, s in slices.items()},
        "alive_in_store": int(alive.sum()), "dead_in_store": int((~alive).sum()),
        "dead_in_training": int(dead_train.sum()), "stored_vectors": a.n_vectors,
        "decision_scale": bt.scale, "q": cfg.q,
        "dominant_counts": {b: int((bt.dominant == i).sum()) for i, b in enumerate(branches)}
        | {"none": int((bt.dominant == NONE).sum())},
        "branches": table,
        "permuted_channels_control": {
            "significant": int(ctrl_rej.any(1).sum()),
            "expected_under_null": "≈0 latents (BH at q under the global null)",
            "per_branch": {b: int(ctrl_rej[:, i].sum()) for i, b in enumerate(branches)}},
        "beta_approximation_vs_monte_carlo": _beta_vs_mc(bt, cfg.n_perm),
        "median_effective_dimension": float(np.nanmedian(bt.d_eff)),
        "knn_branch_agreement": knn,
        "category_test": cat.category_test(animal, bt.dominant, branches),
        "embedding": emb, "figures": figs, "pvalue_note": PVALUE_NOTE,
        "seconds": round(time.time() - t0, 1),
    }
    rows = []
    names = bt.dominant_names()
    for i in range(n):
        r: dict[str, Any] = {
            "layer": layer, "latent": i, "alive": bool(alive[i]),
            "dead_in_training": bool(dead_train[i]),
            "firing_rate": float(a.firing_rate[i]), "mean_activation": float(a.mean_activation[i]),
            "mean_when_active": float(a.mean_when_active[i]),
            "n_images_fired": int(a.n_images_fired[i]), "dominant": names[i],
            "d_eff": float(bt.d_eff[i])}
        for j, b in enumerate(branches):
            r |= {f"paper_ratio_{b}": bt.paper_ratio[i, j], f"full_ratio_{b}": bt.full_ratio[i, j],
                  f"paper_ratio_std_{b}": bt.paper_ratio_std[i, j],
                  f"full_ratio_std_{b}": bt.full_ratio_std[i, j],
                  f"enrichment_{b}": bt.enrichment[i, j], f"p_perm_{b}": bt.p_perm[i, j],
                  f"q_perm_{b}": bt.q_perm[i, j], f"p_perm_paper_{b}": bt.p_perm_paper[i, j],
                  f"p_beta_{b}": bt.p_beta[i, j], f"p_isotropic_{b}": bt.p_iso[i, j],
                  f"attribution_{b}": attr[i, j]}
        r |= {"top_category": top_cat[i], "animal_fraction": animal[i], "dog_fraction": dog[i],
              "top_images": ";".join(str(store.images[t].get("id", t)) for t in tops[i]),
              "top_labels": ";".join(str(labels[t]) for t in tops[i])}
        rows.append(r)
    log(f"{layer}: done in {summary['seconds']} s")
    return {"summary": summary, "rows": rows, "table": table, "dominant": bt.dominant,
            "n_images_fired": a.n_images_fired, "branches": branches}


def _codes(sae, arr, rows: np.ndarray, batch: int) -> sp.csr_matrix:
    parts = []
    with torch.no_grad():
        for s in range(0, rows.size, batch):
            x = torch.from_numpy(np.ascontiguousarray(arr[rows[s:s + batch]], np.float32))
            dev = next(sae.parameters()).device
            parts.append(sp.csr_matrix(sae.encode(x.to(dev)).cpu().numpy()))
    return sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, sae.cfg.n_latents))


def _grid(store, layer: str, variant: str) -> tuple[int, int] | None:
    grid = store.manifest.get("widths", {}).get(layer, {}).get("grid")
    if grid:
        return tuple(int(g) for g in grid)
    try:
        from branchlens.model import output_shape

        return tuple(output_shape(variant, layer)[1:])
    except Exception:
        prov = np.asarray(store.provenance(layer))
        return (int(prov[:, 1].max()) + 1, int(prov[:, 2].max()) + 1) if prov.size else None


def cross_layer(a: str, b: str, res: dict, saes: dict, store, cfg: AnalysisConfig,
                log: Callable[[str], None]) -> dict:
    """Match latents of layers a and b by co-activation and test dominant-branch agreement."""
    variant = saes[a].cfg.variant or store.manifest.get("variant")
    ga, gb = _grid(store, a, variant), _grid(store, b, variant)
    out: dict[str, Any] = {"layers": [a, b], "grid": [ga, gb]}
    if ga != gb:
        return {**out, "skipped": "different spatial grids; positions cannot be aligned"}
    ia, ib = align_rows(np.asarray(store.provenance(a)), np.asarray(store.provenance(b)))
    out["aligned_samples"] = int(ia.size)
    if ia.size == 0:
        return {**out, "skipped": "no shared (image, y, x) samples in the store"}
    log(f"cross-layer {a} ↔ {b}: {ia.size} aligned samples")
    za = _codes(saes[a], store.array(a), ia, cfg.batch_size)
    zb = _codes(saes[b], store.array(b), ib, cfg.batch_size)
    ea = res[a]["n_images_fired"] >= cfg.min_images
    eb = res[b]["n_images_fired"] >= cfg.min_images
    best, corr = best_matches(za, zb, ea, eb)
    finite = corr[np.isfinite(corr)]
    out |= {
        "min_images": cfg.min_images,
        "excluded_a_few_images": int((~ea).sum()), "excluded_b_few_images": int((~eb).sum()),
        "eligible_a": int(ea.sum()), "eligible_b": int(eb.sum()),
        "match_corr_quantiles": ({str(q): float(np.quantile(finite, q))
                                  for q in (0.1, 0.5, 0.9, 0.99)} if finite.size else {}),
    }
    out["consistency"] = consistency(res[a]["dominant"], res[b]["dominant"], best, corr,
                                     res[a]["branches"], threshold=cfg.match_threshold,
                                     seed=cfg.seed)
    return out


def analyze(run_dir: str | Path, *, layers: list[str] | None = None, store=None,
            config: AnalysisConfig | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Analyse every trained layer of a run; writes ``RUN/analysis/`` and returns the summary.

    ``store`` may be given (any object with the CONTRACTS store API); else ``RUN/store``.
    """
    from branchlens.sae import TopKSAE

    run_dir = Path(run_dir)
    cfg = config or AnalysisConfig()
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    log = log or (lambda s: None)
    out_dir = run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    if store is None:
        from branchlens.store import ActivationStore

        store = ActivationStore.open(run_dir / "store")
    layers = layers or find_layers(run_dir)
    if not layers:
        raise FileNotFoundError(f"no trained SAEs under {run_dir / 'sae'}")
    layers = sorted(layers, key=_layer_order)
    torch.manual_seed(cfg.seed)
    saes, res = {}, {}
    for layer in layers:
        sae = TopKSAE.load(run_dir / "sae" / layer, device=cfg.device)
        sae.eval()
        saes[layer] = sae
        res[layer] = analyze_layer(layer, sae, store, cfg, out_dir, log)
    pairs = list(zip(layers[:-1], layers[1:], strict=False))
    if len(layers) > 2:
        pairs.append((layers[0], layers[-1]))
    cross = [cross_layer(a, b, res, saes, store, cfg, log) for a, b in pairs]
    rows = [r for layer in layers for r in res[layer]["rows"]]
    table = [{"layer": t.pop("layer"), **t} for layer in layers for t in res[layer]["table"]]
    _write_csv(out_dir / "latents.csv", rows)
    _write_csv(out_dir / "layers.csv", table)
    summary = {
        "run_dir": str(run_dir), "config": asdict(cfg), "layers": layers,
        "per_layer": {layer: res[layer]["summary"] for layer in layers},
        "cross_layer": cross, "pvalue_note": PVALUE_NOTE,
        "provenance": provenance(store_manifest_variant=store.manifest.get("variant")),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def format_table(summary: dict) -> str:
    """Plain-text layer × branch table for the CLI."""
    head = (f"{'layer':<9}{'branch':<6}{'w':>5}{'share':>7}{'sig':>6}{'E[FP]':>7}{'dom':>6}"
            f"{'dom/share':>10}{'naive':>7}{'ctrl':>6}{'iso-ref':>8}{'raw-sig':>8}{'std-sig':>8}"
            f"{'rnd/std':>8}")
    lines = [head, "-" * len(head)]
    for layer, s in summary["per_layer"].items():
        for r in s["branches"]:
            raw = r.get("significant_raw_scale", "-")
            sd = r.get("significant_std_scale", "-")
            lines.append(
                f"{layer:<9}{r['branch']:<6}{r['width']:>5}{r['channel_share']:>7.3f}"
                f"{r['significant']:>6}{r['expected_false_positives']:>7.1f}{r['dominant']:>6}"
                f"{r['dominant_enrichment_vs_channel_share']:>10.2f}"
                f"{r['naive_argmax_paper_ratio']:>7}"
                f"{r['permuted_channels_control_significant']:>6}"
                f"{r['significant_isotropic_reference']:>8}"
                f"{raw:>8}{sd:>8}"
                f"{r.get('std_normalised_random_control_significant', '-'):>8}")
    scales = {s["decision_scale"] for s in summary["per_layer"].values()}
    lines.append(f"sig: BH-significant ({'/'.join(sorted(scales))}-normalised decoder, "
                 "channel-permutation null); E[FP] = q·sig; dom: dominant latents; "
                 "naive: argmax paper ratio; ctrl: sig after one "
                 "channel permutation of all latents; iso-ref: isotropic Beta (reference only); "
                 "raw-sig / std-sig: same test on the raw / activation-std-normalised decoder; "
                 "rnd/std: random raw directions divided by the same std (what that "
                 "normalisation alone creates)")
    lines.append(PVALUE_NOTE)
    for c in summary["cross_layer"]:
        cc = c.get("consistency")
        if cc is None:
            lines.append(f"{c['layers'][0]}↔{c['layers'][1]}: skipped ({c.get('skipped')})")
            continue
        lines.append(
            f"{c['layers'][0]}↔{c['layers'][1]}: pairs={cc['matched_pairs']} "
            f"both-dominant={cc['pairs_both_dominant']} agreement={cc['agreement']:.3f} "
            f"null={cc['null_mean']:.3f} kappa={cc['kappa']:.3f} p={cc['p_value']:.3g} "
            f"(excluded <{c['min_images']} images: {c['excluded_a_few_images']}/"
            f"{c['excluded_b_few_images']})")
    return "\n".join(lines)
