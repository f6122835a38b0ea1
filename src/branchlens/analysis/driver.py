"""One layer's statistics (``analyze_layer``) and one pair of layers' matching (``cross_layer``).

Takes an SAE, a store and an output folder; the analyze stage
(:func:`branchlens.stages.analyze.analyze`) loads them from a run folder, calls these per layer
and writes ``RUN/analysis/``. Data-side numbers (firing, top images, categories, cross-layer
matching) use the SAE's own held-out images only; the summary says so per layer
(``data_split``), and falls back to all stored images — saying that too — when an SAE was
trained without a held-out split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from branchlens.analysis import activity as act
from branchlens.analysis import categories as cat
from branchlens.analysis import controls as ctl
from branchlens.analysis.branches import (
    NONE,
    BranchTest,
    analyze_branches,
    layer_table,
    null_controls,
    ratio_null,
)
from branchlens.analysis.crosslayer import (
    align_rows,
    consistency,
    mutual_best_matches,
    shifted_rows,
)
from branchlens.analysis.embedding import embed_latents, knn_branch_agreement
from branchlens.analysis.figures import embedding_plot, sorted_ratio_curves
from branchlens.analysis.table import specialization
from branchlens.variants import branch_slices

PVALUE_NOTE = ("p-values are per latent; latents are not independent (they share images and "
               "directions), so BH counts and per-latent p-values are approximate. The "
               "cross-layer and category tests use nulls that keep that dependence (shuffled "
               "matching, shifted images, image-cluster bootstrap).")
ALMOST_ALL_DEAD = 0.9  # a layer with more dead latents than this gets a warning in the report


class AnalysisError(ValueError):
    """A run cannot be analysed as it is; the message names the layer and what to run."""


@dataclass
class AnalysisConfig:
    q: float = 0.05  # BH false discovery rate, per branch across tested latents
    n_perm: int = 1000  # first round of channel permutations per latent (then adaptive)
    max_perm: int | None = None  # cap of the adaptive refinement (default ⌈20·m/q⌉)
    n_strata: int = 16  # activation-std strata of the scale rule
    curve_reps: int = 200  # permutation replicates for the paper's sorted-ratio curve
    control_latents: int = 2048  # null directions per control (a random subset of latents)
    relabel_replicates: int = 40  # random channel→branch partitions of the relabelling null
    relabel_perm: int = 200  # permutations per p-value inside the relabelling null
    power_planted: int = 64  # planted latents per branch and boost for the power check
    covariance_rows: int = 20000  # held-out vectors for the data-covariance baseline
    top: int = 64  # top-activating held-out vectors kept per latent
    top_images: int = 16  # distinct top images per latent for categories
    attribution_top: int = 16  # top vectors for the data-side branch attribution
    min_images: int = 20  # distinct firing image groups needed to take part in matching
    match_threshold: float = 0.5  # floor of the correlation for a cross-layer pair
    match_shifts: int = 3  # shifted-image replicates of the matching null
    bootstrap: int = 2000  # image-cluster bootstrap replicates (category test)
    knn_k: int = 10
    embed: str = "auto"  # auto | umap | pca | none
    animal_group_min: float = 0.5  # highlighted group: ≥ this animal fraction of top images
    batch_size: int = 4096
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto: SAE encoding, permutations and kNN

    def __post_init__(self) -> None:
        from branchlens.config import check_seed

        # below 1e-6 the permutation cap ⌈20·m/q⌉ is astronomically large (or overflows)
        if not 1e-6 <= self.q < 1:
            raise ValueError(f"analyze.q must be in [1e-06, 1), got {self.q}")
        check_seed(self.seed)
        if self.embed not in ("auto", "umap", "pca", "none"):
            raise ValueError(f"analyze.embed must be auto | umap | pca | none, got {self.embed!r}")
        for name in ("n_perm", "n_strata", "curve_reps", "control_latents", "top", "top_images",
                     "attribution_top", "min_images", "bootstrap", "knn_k", "batch_size",
                     "relabel_replicates", "relabel_perm", "power_planted", "covariance_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"analyze.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_perm is not None and self.max_perm < self.n_perm:
            raise ValueError("analyze.max_perm must be >= analyze.n_perm")
        if self.match_shifts < 0 or not -1 <= self.match_threshold <= 1:
            raise ValueError("analyze.match_shifts must be >= 0 and match_threshold in [-1, 1]")


class RowView:
    """Rows ``rows`` of a store array as an array-like (slices and index arrays)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, np.int64)
        self.shape = (self.rows.size, int(array.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[self.rows[key]])


def image_groups(store) -> np.ndarray:
    """[n_images] group index: an image and its mirror/crop views share one."""
    from branchlens.data import view_group

    names = [view_group(str(r.get("id", i))) for i, r in enumerate(store.images)]
    _, inv = np.unique(names, return_inverse=True)
    return inv.astype(np.int64)


def _labels(store) -> np.ndarray:
    return np.array([(-1 if im.get("label") is None else int(im["label"]))
                     for im in store.images], dtype=np.int64)


# -- one layer ------------------------------------------------------------------------------------

class Laps:
    """Wall seconds per named step (``summary.json``: ``seconds_steps``; logged by ``-v``)."""

    def __init__(self) -> None:
        self.last, self.steps = time.time(), {}

    def __call__(self, name: str) -> None:
        now = time.time()
        self.steps[name] = round(self.steps.get(name, 0.0) + now - self.last, 2)
        self.last = now


def _beta_vs_mc_tail(bt: BranchTest) -> dict:
    """Beta approximation vs Monte-Carlo in the tail (MC p < 0.01 with ≥ 10 exceedances)."""
    ok = (np.isfinite(bt.p_raw) & np.isfinite(bt.p_beta) & (bt.p_raw < 0.01)
          & (bt.p_raw * (bt.n_perm[:, None] + 1) - 1 >= 10))
    if not ok.any():
        return {"n": 0, "region": "MC p < 0.01 with >= 10 exceedances"}
    d = np.abs(np.log10(np.maximum(bt.p_beta[ok], 1e-300)) - np.log10(bt.p_raw[ok]))
    agree = np.mean((bt.p_beta[ok] < 1e-3) == (bt.p_raw[ok] < 1e-3))
    return {"n": int(ok.sum()), "region": "MC p < 0.01 with >= 10 exceedances",
            "median_abs_log10_diff": float(np.median(d)),
            "q90_abs_log10_diff": float(np.quantile(d, 0.9)),
            "agreement_at_1e-3": float(agree)}


def analyze_layer(layer: str, sae, store, cfg: AnalysisConfig, out_dir: Path,
                  log: Callable[[str], None], held: np.ndarray, split_note: str,
                  groups: np.ndarray) -> dict:
    """All per-latent and per-layer statistics of one layer; returns summary + columns."""
    t0 = time.time()
    lap = Laps()
    variant = sae.cfg.variant or store.manifest.get("variant")
    slices = branch_slices(variant, layer)
    if sae.cfg.branch_slices:
        given = {b: [s.start, s.stop] for b, s in slices.items()}
        if {b: list(v) for b, v in sae.cfg.branch_slices.items()} != given:
            raise AnalysisError(f"{layer}: SAE branch slices {sae.cfg.branch_slices} != "
                                f"variant {given}")
    branches = list(slices)
    dec = sae.decoder_directions().float().cpu().numpy()
    n, d = dec.shape
    std = np.asarray(store.layer_stats(layer)["std"], dtype=np.float64)

    prov = np.asarray(store.provenance(layer))
    img_all = prov[:, 0].astype(np.int64)
    rows = np.flatnonzero(np.isin(img_all, held))
    log(f"{layer}: activity on {rows.size} held-out vectors")
    arr = RowView(store.array(layer), rows)
    img = img_all[rows]
    with torch.no_grad():
        a = act.latent_activity(sae.encode, arr, groups[img], n, top=cfg.top,
                                batch_size=cfg.batch_size, n_images=int(groups.max()) + 1,
                                device=cfg.device)
        attr = act.branch_attribution(sae.center, sae.W_enc.detach().float(), arr, a.top_row,
                                      slices, n_top=cfg.attribution_top)
    lap("activity")
    dead_train = sae.dead_mask().cpu().numpy()
    fired = a.fire_count > 0
    tested = ~dead_train & fired
    if tested.sum() < 3:
        log(f"{layer}: WARNING only {int(tested.sum())} of {n} latents alive; nothing to test")

    log(f"{layer}: {int(tested.sum())} of {n} latents × {d} channels — branch tests")
    tb = time.time()
    bt = analyze_branches(dec, slices, std=std, include=tested, q=cfg.q, n_perm=cfg.n_perm,
                          max_perm=cfg.max_perm, n_strata=cfg.n_strata, seed=cfg.seed,
                          device=cfg.device)
    lap("branch_tests")
    controls = null_controls(dec, slices, std=std, include=tested, q=cfg.q, n_perm=cfg.n_perm,
                             max_perm=cfg.max_perm, n_strata=cfg.n_strata,
                             max_latents=cfg.control_latents, seed=cfg.seed + 100,
                             device=cfg.device)
    lap("null_controls")
    relabelled = ctl.relabelling_null(dec, slices, std=std, include=tested,
                                      replicates=cfg.relabel_replicates, n_perm=cfg.relabel_perm,
                                      n_strata=cfg.n_strata, seed=cfg.seed + 200,
                                      device=cfg.device)
    lap("relabelling_null")
    power = ctl.scale_power(std, slices, cutoffs=ctl.realised_cutoffs(bt.p_scale, cfg.q),
                            q=cfg.q, m=int(tested.sum()), n_planted=cfg.power_planted,
                            n_strata=cfg.n_strata, seed=cfg.seed + 300, device=cfg.device)
    lap("power")
    sample = np.sort(np.random.default_rng(cfg.seed).choice(
        rows.size, min(rows.size, cfg.covariance_rows), replace=False))
    baseline = (ctl.data_baseline(bt.p_raw, bt.p_scale, tested, ctl.covariance(arr[sample]),
                                  slices, std=std, q=cfg.q, n=cfg.control_latents,
                                  n_perm=cfg.n_perm, max_perm=cfg.max_perm,
                                  n_strata=cfg.n_strata, seed=cfg.seed + 400,
                                  device=cfg.device) if sample.size > d else
                {"skipped": f"{sample.size} held-out vectors for a {d}-channel covariance"})
    lap("data_baseline")
    curve_raw = ratio_null(dec, slices, include=tested, n_rep=cfg.curve_reps, seed=cfg.seed,
                           device=cfg.device)
    dstd = dec / np.where(std > 0, std, 1.0)[None, :]
    curve_std = ratio_null(dstd, slices, include=tested, n_rep=cfg.curve_reps,
                           seed=cfg.seed + 1, device=cfg.device)
    t_tests = time.time() - tb
    lap("paper_curves")

    labels = _labels(store)
    animal_img = np.array([np.nan if lab < 0 or cat.is_animal(lab) is None
                           else float(cat.is_animal(lab)) for lab in labels])
    tops = act.top_images(a.top_row, img, cfg.top_images, groups)  # store image indices
    fracs = [cat.category_fractions([labels[i] for i in t if labels[i] >= 0]) for t in tops]
    animal = np.array([f.get("animal", np.nan) for f in fracs])
    dog = np.array([f.get("dog", np.nan) for f in fracs])
    top_cat = [max(cat.CATEGORIES, key=lambda c, f=f: f[c]) if f else "" for f in fracs]
    categories = cat.category_bootstrap(tops, animal_img, groups, bt.dominant, branches,
                                        images=held, n_boot=cfg.bootstrap, seed=cfg.seed)
    categories_robust = cat.category_bootstrap(tops, animal_img, groups, bt.robust_dominant,
                                               branches, images=held, n_boot=cfg.bootstrap,
                                               seed=cfg.seed)

    lap("categories")
    log(f"{layer}: figures, kNN, embedding")
    pr_tested = bt.paper_ratio[tested]
    groups_fig = {"animal top images": np.nan_to_num(animal[tested]) >= cfg.animal_group_min}
    figs = sorted_ratio_curves(pr_tested, curve_raw["band"], branches, bt.widths,
                               out_dir / f"ratio_curves_{layer}",
                               f"{layer}: sorted paper ratio per branch ({int(tested.sum())} "
                               f"alive latents), channel-permutation null 5–95 % (grey, "
                               f"{cfg.curve_reps} replicates)", groups_fig)
    label = bt.robust_dominant  # the scale-controlled label (the raw one is a reference)
    knn = knn_branch_agreement(dec[tested], label[tested], k=cfg.knn_k, seed=cfg.seed,
                               device=cfg.device)
    emb = {"method": "none"}
    if cfg.embed != "none" and tested.sum() >= 3:
        coords, method, note = embed_latents(dec[tested], cfg.embed, seed=cfg.seed)
        figs += embedding_plot(coords, label[tested], branches,
                               out_dir / f"embedding_{layer}",
                               f"{layer}: {int(tested.sum())} alive latents ({method}, cosine "
                               "on unit decoder rows), coloured by robust dominant branch")
        full = np.full((n, 2), np.nan, np.float32)
        full[tested] = coords
        emb = {"method": method, "note": note, "n_points": int(coords.shape[0])}
        np.save(out_dir / f"embedding_{layer}.npy", full)

    lap("figures_knn_embedding")
    table = layer_table(bt)
    for row, b in zip(table, range(len(branches)), strict=True):
        row["layer"] = layer
        for name, c in controls.items():
            row[f"control_{name}"] = c["per_branch"][branches[b]]
        cell = power["branches"][branches[b]]
        row |= {"power_scale": cell["power_scale"],
                "testable_for_scale": cell["testable_for_scale"],
                "relabelling_null_mean": relabelled["per_branch"][branches[b]]["null_mean"],
                "relabelling_observed": relabelled["per_branch"][branches[b]]["observed"]}
        m = label == b
        row["mean_attribution_of_dominant"] = (float(np.nanmean(attr[m, b]))
                                               if m.any() else None)
    n_dead = int(dead_train.sum())
    summary = {
        "layer": layer, "variant": variant, "latents": n, "channels": d,
        "branch_slices": {b: [s.start, s.stop] for b, s in slices.items()},
        "data_split": split_note, "heldout_images": int(held.size),
        "heldout_vectors": int(rows.size),
        "dead_in_training": n_dead, "never_fired_heldout": int((~fired & ~dead_train).sum()),
        "tested": int(tested.sum()),
        "warning": (f"{n - int(tested.sum())} of {n} latents are dead or never fire on "
                    "held-out images" if tested.sum() < (1 - ALMOST_ALL_DEAD) * n else None),
        "sae_eval": (getattr(sae, "meta", {}) or {}).get("eval"),
        "decision": "raw decoder, channel-permutation null (primary); robust = also "
                    "significant within activation-std strata (scale rule)",
        "q": cfg.q,
        "dominant_counts": {b: int((bt.dominant == i).sum()) for i, b in enumerate(branches)}
        | {"none": int(((bt.dominant == NONE) & tested).sum())},
        "robust_dominant_counts": {b: int((bt.robust_dominant == i).sum())
                                   for i, b in enumerate(branches)},
        "branches": table,
        "null_controls": controls,
        "relabelling_null": relabelled, "power": power, "data_baseline": baseline,
        "paper_curve": {"raw": curve_raw["branches"], "std": curve_std["branches"],
                        "replicates": cfg.curve_reps},
        "permutations": {"mean": float(np.mean(bt.n_perm[tested])) if tested.any() else 0,
                         "max": int(bt.n_perm.max()) if n else 0},
        "beta_approximation_vs_monte_carlo_tail": _beta_vs_mc_tail(bt),
        "median_effective_dimension": (float(np.nanmedian(bt.d_eff)) if tested.any()
                                       else None),
        "knn_branch_agreement": knn,
        "category_test": {"dominant": categories, "robust_dominant": categories_robust,
                          "reference": "animal fraction of the same held-out images"},
        "embedding": emb, "figures": figs, "pvalue_note": PVALUE_NOTE,
        "seconds": round(time.time() - t0, 1), "seconds_branch_tests": round(t_tests, 1),
        "seconds_steps": lap.steps,
    }
    names = bt.dominant_names()
    robust_names = bt.dominant_names(robust=True)
    out_rows = []
    for i in range(n):
        r: dict[str, Any] = {
            "layer": layer, "latent": i, "alive": bool(tested[i]),
            "dead_in_training": bool(dead_train[i]),
            "firing_rate": float(a.firing_rate[i]), "mean_activation": float(a.mean_activation[i]),
            "mean_when_active": float(a.mean_when_active[i]),
            "n_images_fired": int(a.n_images_fired[i]), "dominant": names[i],
            "robust_dominant": robust_names[i], "d_eff": float(bt.d_eff[i])}
        for j, b in enumerate(branches):
            r |= {f"paper_ratio_{b}": bt.paper_ratio[i, j], f"full_ratio_{b}": bt.full_ratio[i, j],
                  f"paper_ratio_std_{b}": bt.paper_ratio_std[i, j],
                  f"full_ratio_std_{b}": bt.full_ratio_std[i, j],
                  f"enrichment_{b}": bt.enrichment[i, j],
                  f"enrichment_dict_{b}": bt.enrichment_dict[i, j],
                  f"p_raw_{b}": bt.p_raw[i, j], f"q_raw_{b}": bt.q_raw[i, j],
                  f"p_scale_{b}": bt.p_scale[i, j], f"q_scale_{b}": bt.q_scale[i, j],
                  f"p_paper_{b}": bt.p_paper[i, j], f"p_beta_{b}": bt.p_beta[i, j],
                  f"p_isotropic_{b}": bt.p_iso[i, j], f"attribution_{b}": attr[i, j]}
        r |= {"top_category": top_cat[i], "animal_fraction": animal[i], "dog_fraction": dog[i],
              "top_images": [str(store.images[t].get("id", t)) for t in tops[i]],
              "top_labels": [int(labels[t]) for t in tops[i]]}
        r |= {f"specialization_{b}": specialization(r, b, cfg.q) for b in branches}
        out_rows.append(r)
    lap("rows")
    summary["seconds_steps"] = lap.steps
    log(f"{layer}: done in {summary['seconds']} s (" + ", ".join(
        f"{k} {v:.1f}" for k, v in lap.steps.items()) + ")")
    return {"summary": summary, "rows": out_rows, "table": table, "dominant": label,
            "n_images_fired": a.n_images_fired, "branches": branches, "held_rows": rows}


# -- across layers --------------------------------------------------------------------------------

def _codes(sae, arr, rows: np.ndarray, batch: int) -> sp.csr_matrix:
    parts = []
    dev = next(sae.parameters()).device
    with torch.no_grad():
        for s in range(0, rows.size, batch):
            x = torch.from_numpy(np.ascontiguousarray(arr[rows[s:s + batch]], np.float32))
            vals, idx = sae.encode_sparse(x.to(dev))
            r = np.repeat(np.arange(x.shape[0]), idx.shape[1])
            parts.append(sp.csr_matrix((vals.cpu().numpy().ravel(),
                                        (r, idx.cpu().numpy().ravel())),
                                       shape=(x.shape[0], sae.cfg.n_latents)))
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
                groups: np.ndarray, log: Callable[[str], None]) -> dict:
    """One-to-one matching of latents of layers a and b on held-out samples, its shifted-image
    null, and the dominant-branch agreement of the matched pairs against both nulls."""
    variant = saes[a].cfg.variant or store.manifest.get("variant")
    ga, gb = _grid(store, a, variant), _grid(store, b, variant)
    out: dict[str, Any] = {"layers": [a, b], "grid": [ga, gb]}
    if ga != gb:
        return {**out, "skipped": "different spatial grids; positions cannot be aligned"}
    pa, pb = np.asarray(store.provenance(a)), np.asarray(store.provenance(b))
    ha, hb = res[a]["held_rows"], res[b]["held_rows"]
    ia, ib = align_rows(pa[ha], pb[hb])
    ia, ib = ha[ia], hb[ib]
    out["aligned_samples"] = int(ia.size)
    if ia.size == 0:
        return {**out, "skipped": "no shared held-out (image, y, x) samples in the store"}
    log(f"cross-layer {a} ↔ {b}: {ia.size} aligned held-out samples")
    za = _codes(saes[a], store.array(a), ia, cfg.batch_size)
    zb = _codes(saes[b], store.array(b), ib, cfg.batch_size)
    ea = res[a]["n_images_fired"] >= cfg.min_images
    eb = res[b]["n_images_fired"] >= cfg.min_images
    ma, mb, corr = mutual_best_matches(za, zb, ea, eb)
    null_pairs = []
    pos_a = {int(r): k for k, r in enumerate(ia)}
    pos_b = {int(r): k for k, r in enumerate(ib)}
    for s in range(1, cfg.match_shifts + 1):
        sa, sb = shifted_rows(pa, pb, ia, ib, groups, s)
        if sa.size == 0:
            continue
        # both are aligned held-out rows already encoded: re-index the codes
        zs_a = za[[pos_a[int(r)] for r in sa]]
        zs_b = zb[[pos_b[int(r)] for r in sb]]
        null_pairs.append(mutual_best_matches(zs_a, zs_b, ea, eb))
    null_corr = [c for _, _, c in null_pairs]
    nc = np.concatenate(null_corr) if null_corr else np.zeros(0)
    q99 = float(np.quantile(nc, 0.99)) if nc.size else None
    threshold = max(cfg.match_threshold, q99 if q99 is not None else cfg.match_threshold)
    keep = corr >= threshold
    null_per_shift = [int(np.sum(c >= threshold)) for c in null_corr]
    n_keep = int(keep.sum())
    out |= {
        "min_images": cfg.min_images,
        "excluded_a_few_images": int((~ea).sum()), "excluded_b_few_images": int((~eb).sum()),
        "eligible_a": int(ea.sum()), "eligible_b": int(eb.sum()),
        "mutual_best_pairs": int(corr.size),
        "threshold": threshold, "threshold_floor": cfg.match_threshold,
        "shifted_image_null": {
            "replicates": len(null_corr), "mutual_best_pairs_mean":
                float(np.mean([c.size for c in null_corr])) if null_corr else None,
            "corr_q99": q99, "pairs_above_threshold_per_replicate": null_per_shift},
        "match_corr_quantiles": ({str(q): float(np.quantile(corr, q))
                                  for q in (0.1, 0.5, 0.9, 0.99)} if corr.size else {}),
        "matches": [[int(x), int(y), float(c)] for x, y, c in
                    zip(ma[keep], mb[keep], corr[keep], strict=True)],
    }
    out["consistency"] = consistency(res[a]["dominant"], res[b]["dominant"], ma[keep], mb[keep],
                                     res[a]["branches"], seed=cfg.seed)
    # Second null for the agreement: the same number of best pairs that the matching finds on
    # shifted images (what the procedure itself, e.g. via firing rates, produces).
    da, db = res[a]["dominant"], res[b]["dominant"]
    obs = _agree_counts(da[ma[keep]], db[mb[keep]])
    null = np.sum([_agree_counts(da[x[:n_keep]], db[y[:n_keep]]) for x, y, _ in null_pairs],
                  axis=0) if null_pairs and n_keep else np.zeros(2, np.int64)
    shifted = {"null_pairs_both_dominant": int(null.sum()),
               "null_agreement": float(null[0] / null.sum()) if null.sum() else None}
    if obs.sum() and null.sum():
        from scipy.stats import fisher_exact

        shifted["p_value"] = float(fisher_exact([[obs[0], obs[1]], [null[0], null[1]]],
                                                alternative="greater")[1])
    out["consistency"]["vs_shifted_image_matching"] = shifted
    return out


def _agree_counts(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """[agree, disagree] among pairs where both latents have a dominant branch."""
    both = (la != NONE) & (lb != NONE)
    agree = int(np.sum(la[both] == lb[both]))
    return np.array([agree, int(both.sum()) - agree], np.int64)


def format_table(summary: dict) -> str:
    """Plain-text claims and layer × branch table for the CLI."""
    lines = ["claims of the paper:"]
    for c in summary.get("claims", []):
        lines.append(f"  [{c['verdict']}] {c['claim']} — {c['evidence']}")
    head = (f"{'layer':<9}{'branch':<6}{'w':>5}{'share':>7}{'tested':>7}{'raw':>6}{'scale':>6}"
            f"{'robust':>7}{'byscale':>8}{'dom':>6}{'rdom':>6}{'dom/share':>10}{'naive':>7}"
            f"{'ctl-raw':>8}{'ctl-scl':>8}{'iso-ref':>8}")
    lines += ["", head, "-" * len(head)]
    for layer, s in summary["per_layer"].items():
        for r in s["branches"]:
            lines.append(
                f"{layer:<9}{r['branch']:<6}{r['width']:>5}{r['channel_share']:>7.3f}"
                f"{r['tested']:>7}{r['significant']:>6}{_dash(r['significant_scale']):>6}"
                f"{r['robust']:>7}{_dash(r['explained_by_scale']):>8}{r['dominant']:>6}"
                f"{r['robust_dominant']:>6}{r['dominant_enrichment_vs_channel_share']:>10.2f}"
                f"{r['naive_argmax_paper_ratio']:>7}"
                f"{_dash(r.get('control_raw_rule_null_draws')):>8}"
                f"{_dash(r.get('control_scale_rule_scaled_gaussian')):>8}"
                f"{r['significant_isotropic_reference']:>8}")
        if s.get("warning"):
            lines.append(f"  WARNING {layer}: {s['warning']}")
    lines.append("raw: BH-significant (q per branch) on the raw decoder vs channel permutation; "
                 "scale: vs permutation within activation-std strata; robust: both; byscale: "
                 "raw only (explained by channel scale); dom/rdom: dominant / robust-dominant "
                 "latents; naive: argmax paper ratio; ctl-raw: raw rule on draws from its own "
                 "null; ctl-scl: scale rule on σ-scaled random directions; iso-ref: isotropic "
                 "Beta (reference only). Dead and never-firing latents are not tested.")
    lines.append(PVALUE_NOTE)
    for c in summary["cross_layer"]:
        cc = c.get("consistency")
        if cc is None:
            lines.append(f"{c['layers'][0]}↔{c['layers'][1]}: skipped ({c.get('skipped')})")
            continue
        lines.append(
            f"{c['layers'][0]}↔{c['layers'][1]}: mutual pairs≥{c['threshold']:.2f}="
            f"{cc['matched_pairs']} (shifted-image null: "
            f"{c['shifted_image_null']['pairs_above_threshold_per_replicate']}) "
            f"both-dominant={cc['pairs_both_dominant']} agreement={_num(cc['agreement'])} "
            f"null={_num(cc['null_mean'])} kappa={_num(cc['kappa'])} p={_num(cc['p_value'])}")
    return "\n".join(lines)


def _dash(x: Any) -> str:
    return "-" if x is None else str(x)


def _num(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3g}"


_MOVED = {"analyze", "find_layers", "load_layer_sae"}  # to branchlens.stages.analyze


def __getattr__(name: str):
    if name in _MOVED:  # lazy: the stage imports this module
        from branchlens.stages import analyze as stage  # moved; kept for one release

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
