"""One layer's statistics: :func:`analyze_layer` runs them in order and assembles its summary.

Takes an SAE, a store and an output folder; the analyze stage
(:func:`branchlens.stages.analyze.analyze`) loads them from a run folder, calls this per layer,
matches layer pairs (:func:`branchlens.analysis.crosslayer.cross_layer`) and writes
``RUN/analysis/``. Data-side numbers (firing, top images, categories, cross-layer matching) use
the SAE's own held-out images only; the summary says so per layer (``data_split``), and falls
back to all stored images — saying that too — when an SAE was trained without a held-out split.

The statistics live beside this module (``branches``, ``controls``, ``activity``,
``categories``, ``embedding``, ``figures``); the rows of ``latents.csv`` are built by
:func:`branchlens.analysis.table.latent_rows`, the block's settings are
:class:`branchlens.analysis.config.AnalysisConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from branchlens.analysis.config import AnalysisConfig, AnalysisError
from branchlens.analysis.crosslayer import cross_layer
from branchlens.analysis.embedding import embed_latents, knn_branch_agreement
from branchlens.analysis.figures import embedding_plot, sorted_ratio_curves
from branchlens.analysis.inputs import RowView, heldout_rows, image_groups, image_labels
from branchlens.analysis.table import latent_rows
from branchlens.analysis.text import PVALUE_NOTE, format_table
from branchlens.layout import embedding_file
from branchlens.variants import branch_slices

# the analyze stage's names, re-exported from their homes (config, crosslayer, inputs, text)
__all__ = ["PVALUE_NOTE", "AnalysisConfig", "AnalysisError", "analyze_layer", "cross_layer",
           "format_table", "image_groups"]

ALMOST_ALL_DEAD = 0.9  # a layer with more dead latents than this gets a warning in the report


class Laps:
    """Wall seconds per named step (``summary.json``: ``seconds_steps``; logged by ``-v``)."""

    def __init__(self) -> None:
        self.last, self.steps = time.time(), {}

    def __call__(self, name: str) -> None:
        now = time.time()
        self.steps[name] = round(self.steps.get(name, 0.0) + now - self.last, 2)
        self.last = now


def analyze_layer(layer: str, sae, store, cfg: AnalysisConfig, out_dir: Path,
                  log: Callable[[str], None], held: np.ndarray, split_note: str,
                  groups: np.ndarray) -> dict:
    """All per-latent and per-layer statistics of one layer; returns summary + columns."""
    t0, lap = time.time(), Laps()
    variant = sae.cfg.variant or store.manifest.get("variant")
    slices = checked_slices(layer, sae, variant)
    branches = list(slices)
    dec = sae.decoder_directions().float().cpu().numpy()
    n, d = dec.shape
    std = np.asarray(store.layer_stats(layer)["std"], dtype=np.float64)

    rows, img = heldout_rows(store, layer, held)
    log(f"{layer}: activity on {rows.size} held-out vectors")
    arr = RowView(store.array(layer), rows)
    with torch.no_grad():
        a = act.latent_activity(sae.encode_sparse, arr, groups[img], n, top=cfg.top,
                                batch_size=cfg.batch_size, n_images=int(groups.max()) + 1,
                                device=cfg.device, keep_codes=True)
        attr = act.branch_attribution(sae.center, sae.W_enc.detach().float(), arr, a.top_row,
                                      slices, n_top=cfg.attribution_top)
    lap("activity")
    dead_train = sae.dead_mask().cpu().numpy()
    fired = a.fire_count > 0
    tested = ~dead_train & fired
    n_tested = int(tested.sum())
    if n_tested < 3:
        log(f"{layer}: WARNING only {n_tested} of {n} latents alive; nothing to test")

    log(f"{layer}: {n_tested} of {n} latents × {d} channels — branch tests")
    tests = branch_tests(dec, slices, std, tested, arr, cfg, lap)
    top = top_image_categories(store, a, img, groups, tests.bt, branches, held, cfg)
    lap("categories")
    log(f"{layer}: figures, kNN, embedding")
    label = tests.bt.robust_dominant  # the scale-controlled label (the raw one is a reference)
    figs, knn, emb = _figures(layer, dec, tested, label, tests, top.animal, branches, cfg,
                              out_dir)
    lap("figures_knn_embedding")
    table = _branch_rows(layer, tests, attr, label, branches)
    summary = {
        "layer": layer, "variant": variant, "latents": n, "channels": d,
        "branch_slices": {b: [s.start, s.stop] for b, s in slices.items()},
        "data_split": split_note, "heldout_images": int(held.size),
        "heldout_vectors": int(rows.size),
        "dead_in_training": int(dead_train.sum()),
        "never_fired_heldout": int((~fired & ~dead_train).sum()), "tested": n_tested,
        "warning": (f"{n - n_tested} of {n} latents are dead or never fire on held-out images"
                    if n_tested < (1 - ALMOST_ALL_DEAD) * n else None),
        "sae_eval": (getattr(sae, "meta", {}) or {}).get("eval"),
        **tests.summary(cfg, tested, table, branches),
        "knn_branch_agreement": knn, "category_test": top.test,
        "embedding": emb, "figures": figs, "pvalue_note": PVALUE_NOTE,
        "seconds": round(time.time() - t0, 1), "seconds_branch_tests": round(tests.seconds, 1),
        "seconds_steps": lap.steps,
    }
    out_rows = _latent_rows(layer, store, branches, cfg.q, tested, dead_train, a, attr,
                            tests.bt, top)
    lap("rows")
    summary["seconds_steps"] = lap.steps
    log(f"{layer}: done in {summary['seconds']} s (" + ", ".join(
        f"{k} {v:.1f}" for k, v in lap.steps.items()) + ")")
    return {"summary": summary, "rows": out_rows, "table": table, "dominant": label,
            "n_images_fired": a.n_images_fired, "branches": branches, "held_rows": rows,
            "codes": a.codes}


# -- the steps ------------------------------------------------------------------------------------

def checked_slices(layer: str, sae, variant: str) -> dict[str, slice]:
    """The variant's branch slices of ``layer``, refused unless the SAE was made with them."""
    slices = branch_slices(variant, layer)
    if sae.cfg.branch_slices:
        given = {b: [s.start, s.stop] for b, s in slices.items()}
        if {b: list(v) for b, v in sae.cfg.branch_slices.items()} != given:
            raise AnalysisError(f"{layer}: SAE branch slices {sae.cfg.branch_slices} != "
                                f"variant {given}")
    return slices


@dataclass
class LayerTests:
    """The decoder-side tests of one layer and their controls."""

    bt: BranchTest  # both rules per latent and branch
    controls: dict  # null controls (the rules on draws from their own nulls)
    relabelled: dict  # random channel→branch partitions
    power: dict  # the scale rule's power on planted latents
    baseline: dict  # the same tests on directions drawn from the data's covariance
    curve_raw: dict  # the paper's sorted-ratio curve against its permutation band
    curve_std: dict  # the same on activation-std-normalised directions
    seconds: float

    def summary(self, cfg: AnalysisConfig, tested: np.ndarray, table: list[dict],
                branches: list[str]) -> dict[str, Any]:
        """The summary keys these tests fill, in the order ``summary.json`` has them."""
        bt = self.bt
        return {
            "decision": "raw decoder, channel-permutation null (primary); robust = also "
                        "significant within activation-std strata (scale rule)",
            "q": cfg.q,
            "dominant_counts": {b: int((bt.dominant == i).sum()) for i, b in enumerate(branches)}
            | {"none": int(((bt.dominant == NONE) & tested).sum())},
            "robust_dominant_counts": {b: int((bt.robust_dominant == i).sum())
                                       for i, b in enumerate(branches)},
            "branches": table,
            "null_controls": self.controls,
            "relabelling_null": self.relabelled, "power": self.power,
            "data_baseline": self.baseline,
            "paper_curve": {"raw": self.curve_raw["branches"], "std": self.curve_std["branches"],
                            "replicates": cfg.curve_reps},
            "permutations": {"mean": float(np.mean(bt.n_perm[tested])) if tested.any() else 0,
                             "max": int(bt.n_perm.max()) if tested.size else 0},
            "beta_approximation_vs_monte_carlo_tail": _beta_vs_mc_tail(bt),
            "median_effective_dimension": (float(np.nanmedian(bt.d_eff)) if tested.any()
                                           else None),
        }


def branch_tests(dec: np.ndarray, slices: dict[str, slice], std: np.ndarray,
                 tested: np.ndarray, arr: RowView, cfg: AnalysisConfig,
                 lap: Laps) -> LayerTests:
    """Both branch rules on the decoder rows of the ``tested`` latents, and every control."""
    t0 = time.time()
    d = dec.shape[1]
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
        len(arr), min(len(arr), cfg.covariance_rows), replace=False))
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
    seconds = time.time() - t0
    lap("paper_curves")
    return LayerTests(bt, controls, relabelled, power, baseline, curve_raw, curve_std, seconds)


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


@dataclass
class TopImages:
    """Each latent's top held-out images and what they show."""

    labels: np.ndarray  # [n_images] class of each store image (−1: none)
    tops: list[np.ndarray]  # per latent: store image indices, best first
    animal: np.ndarray  # [n_latents] animal fraction of the labelled top images
    dog: np.ndarray  # [n_latents] dog fraction
    top_category: list[str]  # per latent: the most frequent category ("" without labels)
    test: dict  # the category test of the dominant and robust-dominant latents


def top_image_categories(store, a: act.Activity, img: np.ndarray, groups: np.ndarray,
                         bt: BranchTest, branches: list[str], held: np.ndarray,
                         cfg: AnalysisConfig) -> TopImages:
    """Top images per latent, their categories, and the image-cluster bootstrap test of
    whether a branch's dominant latents see more animals than the held-out images do."""
    labels = image_labels(store)
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
    return TopImages(labels, tops, animal, dog, top_cat,
                     {"dominant": categories, "robust_dominant": categories_robust,
                      "reference": "animal fraction of the same held-out images"})


def _figures(layer: str, dec: np.ndarray, tested: np.ndarray, label: np.ndarray,
             tests: LayerTests, animal: np.ndarray, branches: list[str], cfg: AnalysisConfig,
             out_dir: Path) -> tuple[list[str], dict, dict]:
    """The sorted-ratio curves, the kNN branch agreement and the embedding (figure + npy)."""
    bt, n = tests.bt, dec.shape[0]
    groups_fig = {"animal top images": np.nan_to_num(animal[tested]) >= cfg.animal_group_min}
    figs = sorted_ratio_curves(bt.paper_ratio[tested], tests.curve_raw["band"], branches,
                               bt.widths, out_dir / f"ratio_curves_{layer}",
                               f"{layer}: sorted paper ratio per branch ({int(tested.sum())} "
                               f"alive latents), channel-permutation null 5–95 % (grey, "
                               f"{cfg.curve_reps} replicates)", groups_fig)
    knn = knn_branch_agreement(dec[tested], label[tested], k=cfg.knn_k, seed=cfg.seed,
                               device=cfg.device)
    emb = {"method": "none"}
    if cfg.embed != "none" and tested.sum() >= 3:
        coords, method, note = embed_latents(dec[tested], cfg.embed, seed=cfg.seed)
        figs += embedding_plot(coords, label[tested], branches,
                               out_dir / Path(embedding_file(layer)).stem,
                               f"{layer}: {int(tested.sum())} alive latents ({method}, cosine "
                               "on unit decoder rows), coloured by robust dominant branch")
        full = np.full((n, 2), np.nan, np.float32)
        full[tested] = coords
        emb = {"method": method, "note": note, "n_points": int(coords.shape[0])}
        np.save(out_dir / embedding_file(layer), full)
    return figs, knn, emb


def _branch_rows(layer: str, tests: LayerTests, attr: np.ndarray, label: np.ndarray,
                 branches: list[str]) -> list[dict]:
    """The layer's rows of ``layers.csv``: the branch table plus its controls and power."""
    table = layer_table(tests.bt)
    for row, b in zip(table, range(len(branches)), strict=True):
        row["layer"] = layer
        for name, c in tests.controls.items():
            row[f"control_{name}"] = c["per_branch"][branches[b]]
        cell = tests.power["branches"][branches[b]]
        per_branch = tests.relabelled["per_branch"][branches[b]]
        row |= {"power_scale": cell["power_scale"],
                "testable_for_scale": cell["testable_for_scale"],
                "relabelling_null_mean": per_branch["null_mean"],
                "relabelling_observed": per_branch["observed"]}
        m = label == b
        row["mean_attribution_of_dominant"] = (float(np.nanmean(attr[m, b]))
                                               if m.any() else None)
    return table


def _latent_rows(layer: str, store, branches: list[str], q: float, tested: np.ndarray,
                 dead_train: np.ndarray, a: act.Activity, attr: np.ndarray, bt: BranchTest,
                 top: TopImages) -> list[dict[str, Any]]:
    """The layer's rows of ``latents.csv`` (:func:`branchlens.analysis.table.latent_rows`)."""
    ids = [[str(store.images[t].get("id", t)) for t in ts] for ts in top.tops]
    return latent_rows(layer, branches, q, {
        "alive": tested, "dead_in_training": dead_train, "firing_rate": a.firing_rate,
        "mean_activation": a.mean_activation, "mean_when_active": a.mean_when_active,
        "n_images_fired": a.n_images_fired, "dominant": bt.dominant_names(),
        "robust_dominant": bt.dominant_names(robust=True), "d_eff": bt.d_eff,
        "top_category": top.top_category, "animal_fraction": top.animal,
        "dog_fraction": top.dog, "top_images": ids,
        "top_labels": [[int(top.labels[t]) for t in ts] for ts in top.tops],
    }, {
        "paper_ratio": bt.paper_ratio, "full_ratio": bt.full_ratio,
        "paper_ratio_std": bt.paper_ratio_std, "full_ratio_std": bt.full_ratio_std,
        "enrichment": bt.enrichment, "enrichment_dict": bt.enrichment_dict,
        "p_raw": bt.p_raw, "q_raw": bt.q_raw, "p_scale": bt.p_scale, "q_scale": bt.q_scale,
        "p_paper": bt.p_paper, "p_beta": bt.p_beta, "p_isotropic": bt.p_iso,
        "attribution": attr,
    })


_MOVED = {"analyze", "find_layers", "load_layer_sae"}  # to branchlens.stages.analyze


def __getattr__(name: str):
    if name in _MOVED:  # lazy: the stage imports this module
        from branchlens.stages import analyze as stage  # moved; kept for one release

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
