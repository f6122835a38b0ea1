"""The visualize, examples and circuits stages (``branchlens visualize | examples | circuits``).

One file for the three: they share the run-folder helpers below (the SAE checked against the
store, the model with the store's weights, the image source, the evidence plan). Each reads
``RUN/sae/<layer>/`` (and ``RUN/store/manifest.json`` for the image source, or an explicit
``source``) and writes under ``RUN/viz/``; the CLI only parses options.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from branchlens.artifacts import provenance, write_json
from branchlens.data import ImageSource
from branchlens.run import ProvenanceError, Run
from branchlens.settings import CircuitsConfig, ExamplesConfig, VisualizeConfig
from branchlens.threads import heavy_stage

__all__ = ["ProvenanceError", "circuits_stage", "examples_stage", "run_source",
           "visualize_stage"]

def load_sae(run_dir: str | Path, layer: str, device: str = "cpu"):
    """The trained SAE of ``RUN/sae/<layer>/`` (see :meth:`branchlens.Run.sae`)."""
    return Run(run_dir, device=device).sae(layer)


def run_source(run_dir: str | Path, source: str | None = None) -> tuple[ImageSource, int | None]:
    """The image source of the run's store (or ``source``): see :meth:`Run.source`."""
    return Run(run_dir).source(source)


def _validate(block: str, values: dict) -> None:
    """The run schema's checks (types, counts >= 1) for a direct call or CLI command too."""
    from branchlens.config import check_values, fields_of

    fields = fields_of(globals()[f"{block}_stage"])  # the stage's own signature is the schema
    check_values(block, {k: v for k, v in values.items() if k in fields}, fields)


def store_provenance(run_dir: str | Path) -> dict | None:
    return Run(run_dir).store_provenance()


def check_sae_store(run_dir: str | Path, sae) -> None:
    Run(run_dir).check_sae(sae)


def _model(variant: str, weights: str | None, device: str, run_dir: str | Path | None = None):
    """The network the run's store was harvested with (see :meth:`Run.model`) and its weights
    info; without a run, the given weights."""
    if run_dir is None:
        from branchlens.devices import resolve_device
        from branchlens.weights import load_model

        return load_model(variant, weights, resolve_device(device))
    model = Run(run_dir, device=device).model(weights, variant)
    return model, model.weights_info


def _variant_of(sae) -> str:
    return getattr(sae.cfg, "variant", None) or "bvlc_googlenet"


def pick_latents(sae, n: int, seed: int = 0) -> list[int]:
    """A seeded sample of latents that are not dead (per the SAE's own counter, if any)."""
    n_lat = sae.decoder_directions().shape[0]
    alive = torch.ones(n_lat, dtype=torch.bool)
    if hasattr(sae, "dead_mask"):
        alive = ~sae.dead_mask().cpu()
    pool = alive.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    return sorted(pool[torch.randperm(pool.numel(), generator=gen)[:n]].tolist())


@heavy_stage("visualize")
def visualize_stage(  # the defaults are the visualize block's (settings.VisualizeConfig)
    run_dir: str | Path, layer: str,
    latents: Sequence[int] | None = VisualizeConfig.latents,
    n_latents: int = VisualizeConfig.n_latents,
    objective: str = VisualizeConfig.objective,
    branch: str | None = VisualizeConfig.branch,
    size: int = VisualizeConfig.size,
    steps: int = VisualizeConfig.steps,
    lr: float = VisualizeConfig.lr,
    seed: int = VisualizeConfig.seed,
    batch_size: int = VisualizeConfig.batch_size,
    weights: str | None = VisualizeConfig.weights,
    device: str = VisualizeConfig.device,
    show_progress: bool = VisualizeConfig.show_progress,
    redirect_relu_steps: int = VisualizeConfig.redirect_relu_steps,
    select: str = VisualizeConfig.select,
    per_cell: int = VisualizeConfig.per_cell,
    pairs: int = VisualizeConfig.pairs,
    branch_views: bool = VisualizeConfig.branch_views,
) -> dict:
    """Feature visualizations of SAE latents (``objective`` latent/direction[_mean]) or of the
    layer's own channels (``channel`` / ``neuron``; ``latents`` are then channel ids).

    Without ``latents``: ``select="random"`` renders ``n_latents`` alive latents;
    ``select="evidence"`` renders the latents the claims rest on (analysis first): the
    ``per_cell`` most significant robust latents of every branch with discoveries and the
    latents of the ``pairs`` best cross-layer matches, at most ``n_latents`` (cells first), and
    with ``branch_views`` also each cell latent restricted to its branch (the paper's figure).
    """
    from branchlens.model import output_shape
    from branchlens.viz.featurevis import (
        UNIT_OBJECTIVES,
        check_targets,
        save_featurevis,
        visualize_latents,
        visualize_units,
    )
    from branchlens.viz.render import RenderConfig

    _validate("visualize", locals())
    sae = load_sae(run_dir, layer)
    check_sae_store(run_dir, sae)
    variant = _variant_of(sae)
    units = objective in UNIT_OBJECTIVES
    plan = None
    if units:
        n_units = output_shape(variant, layer)[0]
        lats = list(latents) if latents else list(range(min(n_latents, n_units)))
        check_targets(layer, lats, objective, branch, variant, n_units)
    else:
        n_units = int(sae.decoder_directions().shape[0])
        dead = sae.dead_mask().cpu() if hasattr(sae, "dead_mask") else None
        if latents:
            lats = list(latents)
        elif select == "evidence":
            plan = _evidence(run_dir, layer, per_cell, pairs, n_latents)
            lats = plan["latents"]
        elif select == "random":
            lats = pick_latents(sae, n_latents, seed)
        else:
            raise ValueError(f"visualize.select must be random or evidence, not {select!r}")
        if plan is not None and not lats:
            return _save_evidence(run_dir, layer, plan, {}, objective)
        check_targets(layer, lats, objective, branch, variant, n_units, dead)
    model, winfo = _model(variant, weights, device, run_dir)
    sae = sae.to(next(model.parameters()).device)
    cfg = RenderConfig(size=size, steps=steps, lr=lr, seed=seed,
                       redirect_relu_steps=redirect_relu_steps)
    if units:
        vis = visualize_units(model, layer, lats, objective=objective, cfg=cfg,
                              batch_size=batch_size, show_progress=show_progress)
    else:
        vis = visualize_latents(model, sae, layer, lats, objective=objective, branch=branch,
                                cfg=cfg, batch_size=batch_size, show_progress=show_progress)
    out = Run(run_dir).featurevis_dir(layer)
    meta = {"variant": model.variant.name, "weights": winfo.to_dict()}
    index = save_featurevis(vis, out, layer, cfg, meta)
    if plan is None:
        return index
    views = {}
    for b, js in plan["cells"].items() if branch_views else ():
        bv = visualize_latents(model, sae, layer, js, objective=objective, branch=b, cfg=cfg,
                               batch_size=batch_size, show_progress=show_progress)
        views[b] = save_featurevis(bv, out, layer, cfg, meta)
    _save_evidence(run_dir, layer, plan, views, objective, index)
    return index


def _evidence(run_dir: str | Path, layer: str, per_cell: int, pairs: int, cap: int) -> dict:
    """The analysis' evidence latents of ``layer`` (see analysis/evidence.py), cells first,
    then matched-pair latents, at most ``cap``."""
    from branchlens.analysis.evidence import capped, evidence_plan
    from branchlens.analysis.table import read_latent_table
    from branchlens.run import RunError

    run = Run(run_dir)
    if not run.latent_table_path.is_file():
        raise RunError(f"visualize.select=evidence needs the analysis ({run.latent_table_path} "
                       "is missing): run branchlens analyze first")
    rows = read_latent_table(run.latent_table_path, layer)
    plan = evidence_plan({layer: rows}, run.summary(), per_cell, pairs)[layer]
    return capped(plan, layer, per_cell, cap)


def _save_evidence(run_dir, layer: str, plan: dict, views: dict, objective: str,
                   index: dict | None = None) -> dict:
    files = {e["latent"]: e["file"] for e in (index or {}).get("latents", [])}
    branch_files = {b: {e["latent"]: e["file"] for e in v["latents"]} for b, v in views.items()}
    doc = {"layer": layer, "objective": objective, "cells": plan["cells"],
           "pairs": plan["pairs"],
           "pictures": {str(j): {"full": files.get(j),
                                 **{b: f[j] for b, f in branch_files.items() if j in f}}
                        for j in plan["latents"]}, **provenance()}
    write_json(Run(run_dir).evidence_path(layer), doc)
    return index or {"layer": layer, "objective": objective, "latents": []}


@heavy_stage("examples")
def examples_stage(  # the defaults are the examples block's (settings.ExamplesConfig)
    run_dir: str | Path, layer: str,
    source: str | None = ExamplesConfig.source,
    n_top: int = ExamplesConfig.n_top,
    latents: Sequence[int] | None = ExamplesConfig.latents,
    n_strips: int = ExamplesConfig.n_strips,
    maps: bool = ExamplesConfig.maps,
    batch_size: int = ExamplesConfig.batch_size,
    limit: int | None = ExamplesConfig.limit,
    weights: str | None = ExamplesConfig.weights,
    device: str = ExamplesConfig.device,
    seed: int = ExamplesConfig.seed,
    show_progress: bool = ExamplesConfig.show_progress,
    gallery: bool = ExamplesConfig.gallery,
    gallery_size: int = ExamplesConfig.gallery_size,
    heldout: bool = ExamplesConfig.heldout,
    select: str = ExamplesConfig.select,
    per_cell: int = ExamplesConfig.per_cell,
    pairs: int = ExamplesConfig.pairs,
) -> dict:
    """Top-``n_top`` held-out images of every latent in one streaming pass
    (``top.safetensors``), the gallery of every latent that fires (``gallery``: its best
    ``gallery_size`` distinct images, each stored once, with the latent's map on each, drawn as
    receptive-field crops by the report; see :mod:`branchlens.viz.sprites`), and full-size
    strips (128 px crops of the receptive field, the latent's map overlaid) for ``latents``, or
    else ``n_strips`` latents: with ``select="evidence"`` the latents the claims rest on first
    (as the visualize stage picks them; needs the analysis), then sampled firing ones.

    ``heldout``: only the SAE's held-out images of the run's store (the images the analysis
    measures on; all of the source when the run has no store); ``limit``: the first N of them.
    What a killed earlier call left in the folder (temp files, an unfinished gallery) is
    removed first.
    """
    from branchlens.viz.examples import (
        CodeCache,
        example_maps,
        save_examples,
        save_top_table,
        top_examples,
    )
    from branchlens.viz.sprites import heldout_indices, save_gallery, sweep_leftovers

    _validate("examples", locals())
    if gallery_size < 1:
        from branchlens.config import ConfigError

        raise ConfigError(f"examples.gallery_size must be >= 1, got {gallery_size}")
    if select not in ("random", "evidence"):
        raise ValueError(f"examples.select must be random or evidence, not {select!r}")
    sae = load_sae(run_dir, layer)
    check_sae_store(run_dir, sae)
    model, winfo = _model(_variant_of(sae), weights, device, run_dir)
    sae = sae.to(next(model.parameters()).device)
    src, n_used = run_source(run_dir, source)
    held, note = heldout_indices(run_dir, sae) if heldout else (None, "all images")
    pool = held if held is not None else list(range(min(len(src), n_used or len(src))))
    pool = [i for i in pool if i < len(src)][:limit or None]
    out = Run(run_dir).examples_dir(layer)
    sweep_leftovers(out)
    # twice the gallery's views: an image and its mirror fill one gallery slot
    n_cand = max(n_top, 2 * gallery_size) if gallery else n_top
    # one forward per image for the three passes below (top lists, gallery, strips)
    codes = CodeCache(model, sae, layer, src, batch_size) if hasattr(sae, "encode_sparse") \
        else None
    cand = top_examples(model, sae, layer, src, n_top=n_cand, batch_size=batch_size,
                        indices=pool, show_progress=show_progress, codes=codes)
    top = cand.head(n_top)
    save_top_table(top, Run(run_dir).top_table_path(layer))
    meta = {"variant": model.variant.name, "weights": winfo.to_dict(),
            "source": getattr(src, "description", ""), "images": note}
    if gallery:
        save_gallery(model, sae, cand, src, out, model.variant, size=gallery_size,
                     batch_size=batch_size, meta=meta, show_progress=show_progress,
                     codes=codes)
    first = _evidence(run_dir, layer, per_cell, pairs, n_strips)["latents"] \
        if select == "evidence" and not latents else []
    fill = [j for j in pick_latents(sae, 10 * n_strips, seed) if top.values[j, 0] > 0]
    lats = list(latents) if latents else list(dict.fromkeys(
        [j for j in first if top.values[j, 0] > 0] + fill))[:max(n_strips, len(first))]
    m = example_maps(model, sae, top, lats, src, batch_size, codes) if maps else None
    return save_examples(top, lats, src, out, model.variant, m, meta=meta)


def dominant_for(run_dir: str | Path, layer: str) -> tuple[np.ndarray, list[str]]:
    """The analysis' dominant branch per latent (−1: none); circuits need the analysis first."""
    return Run(run_dir).dominant(layer)


@heavy_stage("circuits")
def circuits_stage(  # the defaults are the circuits block's (settings.CircuitsConfig)
    run_dir: str | Path, up: str, down: str,
    latents: Sequence[int] | None = CircuitsConfig.latents,
    n_latents: int = CircuitsConfig.n_latents,
    n_images: int = CircuitsConfig.n_images,
    flow_latents: int = CircuitsConfig.flow_latents,
    n_perm: int = CircuitsConfig.n_perm,
    top_k: int = CircuitsConfig.top_k,
    ablate: int = CircuitsConfig.ablate,
    source: str | None = CircuitsConfig.source,
    weights: str | None = CircuitsConfig.weights,
    device: str = CircuitsConfig.device,
    batch_size: int = CircuitsConfig.batch_size,
    seed: int = CircuitsConfig.seed,
    show_progress: bool = CircuitsConfig.show_progress,
) -> dict:
    """Top upstream latents, branch flow with a permutation null, and branch ablations."""
    from branchlens.viz import circuits as C
    from branchlens.viz.examples import load_top_table, top_examples

    _validate("circuits", locals())
    sae_up, sae_down = load_sae(run_dir, up), load_sae(run_dir, down)
    check_sae_store(run_dir, sae_up)
    check_sae_store(run_dir, sae_down)
    variant = _variant_of(sae_down)
    model, winfo = _model(variant, weights, device, run_dir)
    dev = next(model.parameters()).device
    sae_up, sae_down = sae_up.to(dev), sae_down.to(dev)
    table = Run(run_dir).top_table_path(down)
    src, n_used = run_source(run_dir, source)
    if table.is_file():
        top = load_top_table(table)
    else:
        n = min(len(src), n_used or len(src))
        top = top_examples(model, sae_down, down, src, n_top=n_images, batch_size=batch_size,
                           indices=range(n), show_progress=show_progress)
    dom_up, names = dominant_for(run_dir, up)
    dom_down, _ = dominant_for(run_dir, down)
    active = [j for j in range(top.values.shape[0]) if top.values[j, 0] > 0]
    gen = np.random.default_rng(seed)
    chosen = list(latents) if latents else sorted(gen.choice(active, min(n_latents, len(active)),
                                                             replace=False).tolist())
    flow_set = _flow_sample(active, dom_down, flow_latents, gen)
    every = sorted(set(chosen) | set(flow_set))
    targets = C.targets_from_top(top, every, n_images)
    x_up = C.upstream_activations(model, up, src, targets, batch_size)
    att = C.attribute(model, sae_up, sae_down, up, down, x_up, targets)
    per = C.per_latent(att)
    keep = [i for i, t in enumerate(att.targets) if t.latent in set(chosen)]
    sub = C.Attribution([att.targets[i] for i in keep], att.latents[keep], att.error[keep],
                        att.bias[keep], att.branches[keep], att.value[keep], att.branch_names)
    rows = C.top_upstream(sub, dom_up, names, top_k)
    flow_ids = [j for j in flow_set if j in per]
    flow = C.branch_flow(torch.stack([per[j]["latents"] for j in flow_ids]),
                         dom_down[flow_ids], dom_up, names, n_perm, seed) if flow_ids else None
    causal = _causal(model, sae_down, up, down, src, att, chosen[:ablate], dom_up, names,
                     batch_size)
    doc = {"up": up, "down": down, "latents": rows,
           "flow": flow.to_dict() if flow else None, "flow_latents": flow_ids,
           "causal": causal, "error_share_mean": float(att.error_share().mean()),
           **provenance(variant=variant, weights=winfo.to_dict(), n_images=n_images)}
    write_json(Run(run_dir).circuits_path(up, down), doc)
    return doc


def _flow_sample(active: list[int], dom: np.ndarray, n: int, gen) -> list[int]:
    """Up to n active latents, spread evenly over their dominant branches."""
    groups = [[j for j in active if dom[j] == b] for b in sorted(set(dom[active].tolist()))]
    per = max(1, n // max(len(groups), 1))
    out = []
    for g in groups:
        out += gen.choice(g, min(per, len(g)), replace=False).tolist()
    return sorted(out)


def _causal(model, sae_down, up, down, src, att, latents, dom_up, names, batch_size) -> list:
    """Zero each branch of ``up`` in the real forward pass; compare with the attributions."""
    from branchlens.data import iter_batches
    from branchlens.viz import circuits as C

    idx = [i for i, t in enumerate(att.targets) if t.latent in set(latents)]
    if not idx:
        return []
    targets = [att.targets[i] for i in idx]
    wanted = sorted({t.image for t in targets})
    imgs = {}
    for b in iter_batches(src, model.variant, batch_size, 0, indices=wanted):
        imgs.update(zip(b.indices, b.images, strict=True))
    x = torch.stack([imgs[t.image] for t in targets]).to(next(model.parameters()).device)
    clean, drops, _ = C.branch_ablation(model, sae_down, up, down, x, targets)
    grouped = C.grouped_by_branch(att.latents[idx], dom_up, len(names))
    out = []
    for j in latents:
        m = torch.tensor([t.latent == j for t in targets])
        out.append({"latent": j, "value": float(clean[m].mean()),
                    "drop": dict(zip(names, drops[m].mean(0).tolist(), strict=True)),
                    "attribution_channels": dict(zip(names, att.branches[idx][m].mean(0)
                                                     .tolist(), strict=True)),
                    "attribution_latents_by_dominant": dict(zip(
                        names, grouped[m].mean(0).tolist(), strict=True))})
    return out
