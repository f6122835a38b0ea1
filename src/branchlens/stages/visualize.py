"""The visualize stage: feature visualizations of SAE latents into ``RUN/viz/featurevis/``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from branchlens.run import Run
from branchlens.settings import VisualizeConfig
from branchlens.stages.vizinputs import (
    check_sae_store,
    evidence_plan_of,
    load_network,
    load_sae,
    pick_latents,
    save_evidence,
    validate_block,
    variant_of,
)
from branchlens.threads import heavy_stage


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

    validate_block("visualize", locals())
    sae = load_sae(run_dir, layer)
    check_sae_store(run_dir, sae)
    variant = variant_of(sae)
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
            plan = evidence_plan_of(run_dir, layer, per_cell, pairs, n_latents)
            lats = plan["latents"]
        elif select == "random":
            lats = pick_latents(sae, n_latents, seed)
        else:
            raise ValueError(f"visualize.select must be random or evidence, not {select!r}")
        if plan is not None and not lats:
            return save_evidence(run_dir, layer, plan, {}, objective)
        check_targets(layer, lats, objective, branch, variant, n_units, dead)
    model, winfo = load_network(variant, weights, device, run_dir)
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
    save_evidence(run_dir, layer, plan, views, objective, index)
    return index


