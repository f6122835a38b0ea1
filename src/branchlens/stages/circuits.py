"""The circuits stage: attribution of latents between two layers into ``RUN/viz/circuits/``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from branchlens.artifacts import provenance, write_json
from branchlens.run import Run
from branchlens.settings import CircuitsConfig
from branchlens.stages.vizinputs import (
    check_sae_store,
    dominant_for,
    load_network,
    load_sae,
    run_source,
    validate_block,
    variant_of,
)
from branchlens.threads import heavy_stage


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

    validate_block("circuits", locals())
    sae_up, sae_down = load_sae(run_dir, up), load_sae(run_dir, down)
    check_sae_store(run_dir, sae_up)
    check_sae_store(run_dir, sae_down)
    variant = variant_of(sae_down)
    model, winfo = load_network(variant, weights, device, run_dir)
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

