"""The examples stage: held-out examples, the gallery and strips of every latent into
``RUN/viz/examples/<layer>/``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from branchlens.run import Run
from branchlens.settings import ExamplesConfig
from branchlens.stages.vizinputs import (
    check_sae_store,
    evidence_plan_of,
    load_network,
    load_sae,
    pick_latents,
    run_source,
    validate_block,
    variant_of,
)
from branchlens.threads import heavy_stage


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

    validate_block("examples", locals())
    if gallery_size < 1:
        from branchlens.config import ConfigError

        raise ConfigError(f"examples.gallery_size must be >= 1, got {gallery_size}")
    if select not in ("random", "evidence"):
        raise ValueError(f"examples.select must be random or evidence, not {select!r}")
    sae = load_sae(run_dir, layer)
    check_sae_store(run_dir, sae)
    model, winfo = load_network(variant_of(sae), weights, device, run_dir)
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
    first = evidence_plan_of(run_dir, layer, per_cell, pairs, n_strips)["latents"] \
        if select == "evidence" and not latents else []
    fill = [j for j in pick_latents(sae, 10 * n_strips, seed) if top.values[j, 0] > 0]
    lats = list(latents) if latents else list(dict.fromkeys(
        [j for j in first if top.values[j, 0] > 0] + fill))[:max(n_strips, len(first))]
    m = example_maps(model, sae, top, lats, src, batch_size, codes) if maps else None
    return save_examples(top, lats, src, out, model.variant, m, meta=meta)


