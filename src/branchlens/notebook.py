"""The notebook conveniences that render pictures or run the network on a run's SAE.

They need the viz library (receptive fields, overlays, feature visualisation), which the run
folder's readers (:mod:`branchlens.run`) must not import: ``Run.encode_images``,
``Latent.top_images`` and ``Latent.visualize`` are one-line calls into this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: branchlens.run calls into this module
    from PIL import Image
    from torch import Tensor

    from branchlens.run import Latent, Run


def encode_images(run: Run, images: Sequence[str | Path | Image.Image], layer: str,
                  batch_size: int = 16) -> Tensor:
    """Images (paths or PIL) → SAE codes of every position, ``[N, n_latents, H, W]``,
    preprocessed exactly as the harvest did for this run's network."""
    import torch

    from branchlens.data import decode_image, preprocess
    from branchlens.viz.examples import latent_maps_of

    model, sae = run.model(), run.sae(layer)
    dev = next(model.parameters()).device
    sae = sae.to(dev)
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack([preprocess(decode_image(im), model.variant)
                         for im in images[s:s + batch_size]])
        out.append(latent_maps_of(model, sae, layer, x.to(dev)).cpu())
    if not out:
        raise ValueError("encode_images needs at least one image")
    return torch.cat(out)


def top_images(latent: Latent, n: int = 9, tile: int = 128) -> list[Image.Image]:
    """Receptive-field crops of the top images, the latent's map overlaid in red.

    The images are the analysis' (held-out, ranked by the stored maximum); each is run
    through the network once to find where in it the latent fires most."""
    import torch

    from branchlens.data import iter_batches
    from branchlens.viz.examples import crop_with_overlay, latent_maps_of, unit_image
    from branchlens.viz.receptive import receptive_field

    ids = latent.top_image_ids[:n]
    if not ids:
        return []
    run, where = latent.run, latent.store_indices(ids)
    src, _ = run.source()
    model, sae = run.model(), run.sae(latent.layer)
    dev = next(model.parameters()).device
    sae = sae.to(dev)
    maps: dict[int, torch.Tensor] = {}
    for batch in iter_batches(src, model.variant, 16, indices=[where[i] for i in ids]):
        m = latent_maps_of(model, sae, latent.layer, batch.images.to(dev))[:, latent.index]
        maps.update(zip(batch.indices, m.cpu(), strict=True))
    rf = receptive_field(model.variant, latent.layer)
    vmax = max((float(m.max()) for m in maps.values()), default=0.0)
    crops = []
    for image_id in ids:
        i = where[image_id]
        if i not in maps:  # unreadable now (moved file): counted out, not fatal
            continue
        m = maps[i]
        y, x = divmod(int(m.argmax()), m.shape[1])
        crops.append(crop_with_overlay(unit_image(src, i, model.variant), rf, y, x, m,
                                       vmax, tile))
    return crops


def visualize(latent: Latent, steps: int = 256, size: int = 224, seed: int = 0) -> Image.Image:
    """The feature picture: the visualize stage's PNG when it rendered this latent, else
    rendered now (``steps`` of Adam on a decorrelated FFT image, not saved)."""
    from PIL import Image

    cached = latent.run.featurevis_file(latent.layer, latent.index)
    if cached is not None:
        return Image.open(cached).convert("RGB")
    from branchlens.viz.featurevis import to_pil, visualize_latents
    from branchlens.viz.render import RenderConfig

    model, sae = latent.run.model(), latent.run.sae(latent.layer)
    sae = sae.to(next(model.parameters()).device)
    vis = visualize_latents(model, sae, latent.layer, [latent.index],
                            cfg=RenderConfig(size=size, steps=steps, seed=seed),
                            batch_size=1, show_progress=False)
    return to_pil(vis.images[0])
