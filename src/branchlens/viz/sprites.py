"""Small receptive-field crops of the top examples of *every* latent, as JPEG sprite sheets.

A 16× SAE has ~8–13 k latents per layer; one PNG strip per latent would be ~10⁴ files and
hundreds of MB. Instead a second streaming pass visits each image that is in some latent's
top list once, computes all latent maps for it, and samples every crop it owes straight at
tile resolution (one batched ``grid_sample`` per image for the pixels and one for the latent's
heatmap). Tiles go into a memory-mapped array, then into sheets of ``per_sheet`` latents ×
``n_tiles`` columns: latent ``j`` is row ``j % per_sheet`` of sheet ``j // per_sheet``, column
``k`` its k-th best example (the order of ``top.safetensors``). The report loads a sheet only
when a latent on it is opened.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from branchlens.artifacts import atomic_path, provenance, write_json
from branchlens.data import ImageSource, iter_batches
from branchlens.progress import progress
from branchlens.viz.examples import TopExamples, latent_maps_of, unit_image
from branchlens.viz.latents import SAELike
from branchlens.viz.receptive import ReceptiveField, receptive_field

RED = torch.tensor([1.0, 0.1, 0.1]).view(1, 3, 1, 1)


def tiles_for_image(image01: Tensor, maps: Tensor, rf: ReceptiveField, ys: Tensor, xs: Tensor,
                    vmax: Tensor, tile: int, alpha: float = 0.6) -> Tensor:
    """Crops [S, 3, tile, tile] in [0, 1] of one image centred on units (ys, xs), each with its
    latent map [S, H, W] overlaid in red relative to ``vmax`` [S]; grey outside the image.

    The same picture as :func:`branchlens.viz.examples.crop_with_overlay` at ``tile`` pixels,
    sampled directly at that size."""
    s = ys.numel()
    size = image01.shape[-1]
    h, w = maps.shape[-2:]
    step = (torch.arange(tile, dtype=torch.float32) + 0.5) * rf.size / tile
    top = torch.tensor([rf.box(int(y), int(x))[0] for y, x in zip(ys, xs, strict=True)],
                       dtype=torch.float32)
    left = torch.tensor([rf.box(int(y), int(x))[1] for y, x in zip(ys, xs, strict=True)],
                        dtype=torch.float32)
    uy = top[:, None] + step[None]  # [S, tile] pixel-edge coordinates
    ux = left[:, None] + step[None]
    gy = (2 * uy / size - 1)[:, :, None].expand(s, tile, tile)
    gx = (2 * ux / size - 1)[:, None, :].expand(s, tile, tile)
    img = torch.cat([image01, torch.ones(1, size, size)])[None]  # 4th channel: inside mask
    grid = torch.stack([gx, gy], -1).reshape(1, s * tile, tile, 2)  # all crops, one call
    px = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    px = px[0].reshape(4, s, tile, tile).permute(1, 0, 2, 3)
    rgb, inside = px[:, :3], px[:, 3:4]
    my = (uy - 0.5 - rf.offset) / rf.stride  # unit coordinates of each pixel centre
    mx = (ux - 0.5 - rf.offset) / rf.stride
    hy = (2 * my / max(h - 1, 1) - 1)[:, :, None].expand(s, tile, tile)
    hx = (2 * mx / max(w - 1, 1) - 1)[:, None, :].expand(s, tile, tile)
    heat = F.grid_sample(maps[:, None].float(), torch.stack([hx, hy], -1), mode="bilinear",
                         padding_mode="border", align_corners=True)
    a = (heat / vmax.clamp_min(1e-8).view(s, 1, 1, 1)).clamp(0, 1) * alpha
    out = rgb * (1 - a) + RED * a
    return out * inside + 0.5 * (1 - inside)


def save_sprites(
    model: nn.Module, sae: SAELike, top: TopExamples, source: ImageSource, out_dir: str | Path,
    variant, *, n_tiles: int = 6, tile: int = 40, per_sheet: int = 256, batch_size: int = 16,
    quality: int = 82, meta: dict | None = None, show_progress: bool = True,
) -> dict:
    """``sprites_<s>.jpg`` + ``sprites.json`` for every latent with a positive example."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rf = receptive_field(variant, top.layer)
    n = top.values.shape[0]
    k = min(n_tiles, top.n_top)
    vals, imgs = top.values[:, :k], top.images[:, :k]
    owed: dict[int, list[tuple[int, int]]] = {}
    for j, kk in (vals > 0).nonzero().tolist():
        owed.setdefault(int(imgs[j, kk]), []).append((j, kk))
    vmax = vals.clamp_min(0).max(1).values
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        mm = np.lib.format.open_memmap(Path(tmp) / "tiles.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, tile, k * tile, 3))
        mm[:] = 255
        wanted = sorted(owed)
        with progress(len(wanted), f"crops {top.layer}", "img",
                      disable=not show_progress) as bar:
            for batch in iter_batches(source, model.variant, batch_size, 0, indices=wanted):
                maps = latent_maps_of(model, sae, top.layer, batch.images.to(device)).cpu()
                for b, i in enumerate(batch.indices):
                    slots = owed[i]
                    js = torch.tensor([j for j, _ in slots])
                    ks = torch.tensor([kk for _, kk in slots])
                    t = tiles_for_image(unit_image(source, i, variant), maps[b, js], rf,
                                        top.ys[js, ks], top.xs[js, ks], vmax[js], tile)
                    arr = (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
                    for (j, kk), a in zip(slots, arr, strict=True):
                        mm[j, :, kk * tile:(kk + 1) * tile] = a
                bar.update(len(batch.indices))
        sheets = []
        for s0 in range(0, n, per_sheet):
            block = np.asarray(mm[s0:s0 + per_sheet]).reshape(-1, k * tile, 3)
            name = f"sprites_{s0 // per_sheet:03d}.jpg"
            with atomic_path(out / name) as tmp_file:
                Image.fromarray(block).save(tmp_file, format="JPEG", quality=quality,
                                            optimize=True)
            sheets.append(name)
        del mm
    index = {"layer": top.layer, "tile": tile, "n_tiles": k, "per_sheet": per_sheet,
             "sheets": sheets, "n_latents": n, "with_examples": int((vals[:, 0] > 0).sum()),
             "n_images": top.n_images,
             "receptive_field": {"size": rf.size, "stride": rf.stride, "offset": rf.offset},
             "order": "top.safetensors (best first); row j % per_sheet of sheet j // per_sheet",
             **provenance(**(meta or {}))}
    write_json(out / "sprites.json", index)
    return index


def sprite_tile(out_dir: str | Path, latent: int, k: int) -> Image.Image:
    """Tile ``k`` of ``latent`` cut back out of its sheet (for checks and notebooks)."""
    import json

    out = Path(out_dir)
    idx = json.loads((out / "sprites.json").read_text())
    t, per = idx["tile"], idx["per_sheet"]
    with Image.open(out / idx["sheets"][latent // per]) as im:
        r = latent % per
        return im.crop((k * t, r * t, (k + 1) * t, (r + 1) * t)).copy()


def heldout_indices(run_dir: str | Path, sae) -> tuple[list[int] | None, str]:
    """The SAE's held-out images of the run's store (as the analysis uses them), or None when
    the run has no store (then the caller uses the whole source)."""
    store_dir = Path(run_dir) / "store"
    if not (store_dir / "manifest.json").is_file():
        return None, "no store: all images of the source"
    from branchlens.store import ActivationStore
    from branchlens.train.sampling import heldout_images

    held, note = heldout_images(sae, ActivationStore.open(store_dir, verify=False))
    return sorted(int(i) for i in held), note
