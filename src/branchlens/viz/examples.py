"""Top dataset examples of SAE latents: one streaming pass, bounded memory, receptive-field crops.

The pass keeps, for every latent of a layer at once, the ``n_top`` images where it fires most
(with the position of its maximum). Each batch contributes its per-image maxima and is merged
into the running table with ``torch.topk``, so memory is O(n_latents · (n_top + batch)) however
many images stream by. Crops are cut around the receptive field of the winning position (size,
stride and offset from :mod:`branchlens.viz.receptive`), with the latent's map overlaid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from branchlens.artifacts import provenance, write_json
from branchlens.data import (
    ImageSource,
    decode_image,
    iter_batches,
    resize_center_crop,
    to_unit_tensor,
)
from branchlens.progress import progress
from branchlens.viz.featurevis import save_png, to_pil
from branchlens.viz.latents import SAELike
from branchlens.viz.receptive import ReceptiveField, receptive_field

OVERLAY_ALPHA = 0.6  # opacity of the latent map at its best example's value
OVERLAY_RED = (1.0, 0.1, 0.1)


@dataclass
class TopExamples:
    """Per latent, the best ``n_top`` (image, y, x, value), sorted by value; image -1 = empty."""

    layer: str
    values: Tensor  # [n_latents, n_top] float, -inf where empty
    images: Tensor  # [n_latents, n_top] int64 source index
    ys: Tensor
    xs: Tensor
    image_ids: dict[int, str] = field(default_factory=dict)
    grid: tuple[int, int] = (0, 0)  # the layer's spatial size
    n_images: int = 0

    @classmethod
    def empty(cls, layer: str, n_latents: int, n_top: int) -> TopExamples:
        neg = torch.full((n_latents, n_top), float("-inf"))
        m1 = torch.full((n_latents, n_top), -1, dtype=torch.long)
        return cls(layer, neg, m1.clone(), m1.clone(), m1.clone())

    @property
    def n_top(self) -> int:
        return self.values.shape[1]

    def head(self, n: int) -> TopExamples:
        """The best ``n`` examples of every latent (the same table when it has no more)."""
        if n >= self.n_top:
            return self
        return TopExamples(self.layer, self.values[:, :n], self.images[:, :n], self.ys[:, :n],
                           self.xs[:, :n], self.image_ids, self.grid, self.n_images)

    def update(self, maps: Tensor, image_indices: Sequence[int]) -> None:
        """Merge a batch of latent maps [B, n_latents, H, W] (one image each)."""
        b, n, h, w = maps.shape
        self.grid = (h, w)
        self.n_images += b
        best, pos = maps.flatten(2).max(2)  # [B, n]: each image counts once per latent
        imgs = torch.as_tensor(list(image_indices), dtype=torch.long)[:, None].expand(b, n)
        vals = torch.cat([self.values, best.t().float()], 1)
        cand_img = torch.cat([self.images, imgs.t()], 1)
        cand_y = torch.cat([self.ys, (pos // w).t()], 1)
        cand_x = torch.cat([self.xs, (pos % w).t()], 1)
        top = vals.topk(self.n_top, dim=1)
        self.values = top.values
        self.images, self.ys, self.xs = (t.gather(1, top.indices) for t in
                                         (cand_img, cand_y, cand_x))

    def entries(self, latent: int) -> list[dict]:
        """The non-empty examples of one latent with a positive activation."""
        out = []
        for v, i, y, x in zip(self.values[latent].tolist(), self.images[latent].tolist(),
                              self.ys[latent].tolist(), self.xs[latent].tolist(), strict=True):
            if i >= 0 and v > 0:
                out.append({"image_index": i, "image_id": self.image_ids.get(i, str(i)),
                            "y": y, "x": x, "value": v})
        return out


def latent_maps_of(model: nn.Module, sae: SAELike, layer: str, images: Tensor) -> Tensor:
    """SAE codes ReLU(TopK(...)) of every position: [B, n_latents, H, W]."""
    with torch.no_grad():
        a = model(images, layers=[layer])[layer]
        b, c, h, w = a.shape
        z = sae.encode(a.permute(0, 2, 3, 1).reshape(-1, c))
        return z.reshape(b, h, w, -1).permute(0, 3, 1, 2)


CACHE_BYTES = 1 << 30  # sparse codes kept per examples stage (~75 KB per 14×14 image, k = 32)


class CodeCache:
    """The sparse SAE codes of every image one examples stage reads, so that its three passes
    (top lists, gallery, strips) run the network once per image instead of three times; the
    maps they get are the same tensors ``latent_maps_of`` gives. Beyond ``max_bytes`` images
    are encoded again when asked for (nothing is dropped)."""

    def __init__(self, model: nn.Module, sae: SAELike, layer: str, source: ImageSource,
                 batch_size: int = 16, max_bytes: int = CACHE_BYTES):
        self.model, self.sae, self.layer, self.source = model, sae, layer, source
        self.batch_size, self.max_bytes, self.bytes = batch_size, max_bytes, 0
        self.n_latents = sae.decoder_directions().shape[0]
        self.entries: dict[int, tuple | None] = {}  # index -> (id, label, vals, idx); None: skipped
        self.grid: tuple[int, int] | None = None
        self.forwards = 0  # images run through the network (for the tests and the log)

    def _encode(self, batch) -> dict[int, tuple]:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            a = self.model(batch.images.to(device), layers=[self.layer])[self.layer]
            b, c, h, w = a.shape
            vals, idx = self.sae.encode_sparse(a.permute(0, 2, 3, 1).reshape(-1, c))
        self.grid, self.forwards = (h, w), self.forwards + b
        vals, idx = vals.cpu().view(b, h * w, -1), idx.cpu().view(b, h * w, -1)
        return {i: (batch.image_ids[k], batch.labels[k], vals[k], idx[k])
                for k, i in enumerate(batch.indices)}

    def batches(self, indices: Sequence[int]):
        """(indices, image ids, labels, maps [B, n_latents, H, W]) over ``indices`` in order,
        ``batch_size`` at a time; undecodable images are left out, as ``iter_batches`` does."""
        order = list(indices)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            fresh: dict[int, tuple] = {}
            missing = [i for i in chunk if i not in self.entries]
            for batch in (iter_batches(self.source, self.model.variant, self.batch_size, 0,
                                       indices=missing) if missing else ()):
                fresh |= self._encode(batch)
            for i in missing:
                e = fresh.get(i)
                if e is None or self.bytes < self.max_bytes:
                    self.entries[i] = e
                    self.bytes += 0 if e is None else e[2].nbytes + e[3].nbytes
            got = [(i, self.entries[i] if i in self.entries else fresh[i]) for i in chunk]
            got = [(i, e) for i, e in got if e is not None]
            if not got:
                continue
            vals = torch.stack([e[2] for _, e in got])
            idx = torch.stack([e[3] for _, e in got])
            b, hw, k = vals.shape
            z = torch.zeros(b * hw, self.n_latents, dtype=vals.dtype).scatter(
                1, idx.view(-1, k), vals.view(-1, k))
            h, w = self.grid
            yield ([i for i, _ in got], [e[0] for _, e in got], [e[1] for _, e in got],
                   z.view(b, h, w, -1).permute(0, 3, 1, 2))


def top_examples(
    model: nn.Module,
    sae: SAELike,
    layer: str,
    source: ImageSource,
    *,
    n_top: int = 16,
    batch_size: int = 16,
    indices: Sequence[int] | None = None,
    workers: int = 0,
    show_progress: bool = True,
    codes: CodeCache | None = None,
) -> TopExamples:
    """One streaming pass over ``source`` keeping the top ``n_top`` images of every latent
    (through ``codes`` when given, which then holds every image's codes for later passes)."""
    device = next(model.parameters()).device
    n_latents = sae.decoder_directions().shape[0]
    top = TopExamples.empty(layer, n_latents, n_top)
    total = len(source) if indices is None else len(indices)
    with progress(total, f"examples {layer}", "img", disable=not show_progress) as bar:
        if codes is not None:
            for ids, names, _, maps in codes.batches(range(total) if indices is None
                                                    else indices):
                top.update(maps, ids)
                top.image_ids.update(zip(ids, names, strict=True))
                bar.update(len(ids))
            return top
        for batch in iter_batches(source, model.variant, batch_size, workers, indices=indices):
            maps = latent_maps_of(model, sae, layer, batch.images.to(device)).cpu()
            top.update(maps, batch.indices)
            top.image_ids.update(zip(batch.indices, batch.image_ids, strict=True))
            bar.update(len(batch.indices))
    return top


def unit_image(source: ImageSource, index: int, variant) -> Tensor:
    """The [0, 1] RGB image the model saw for ``source[index]`` (same resize and crop)."""
    from branchlens.variants import get_variant

    p = get_variant(variant).preprocessing
    return to_unit_tensor(resize_center_crop(decode_image(source[index].payload), p.resize,
                                             p.crop))


def example_maps(
    model: nn.Module, sae: SAELike, top: TopExamples, latents: Sequence[int],
    source: ImageSource, batch_size: int = 16, codes: CodeCache | None = None,
) -> dict[int, Tensor]:
    """Recompute the full latent maps [H, W] on the top images: {latent: [n_top, H, W]}."""
    wanted = sorted({i for j in latents for i in top.images[j].tolist() if i >= 0})
    device = next(model.parameters()).device
    lat = torch.as_tensor(list(latents), dtype=torch.long)
    per_image: dict[int, Tensor] = {}
    if codes is not None:
        for ids, _, _, maps in codes.batches(wanted):
            per_image.update(zip(ids, maps[:, lat], strict=True))
    for batch in (iter_batches(source, model.variant, batch_size, 0, indices=wanted)
                  if codes is None else ()):
        maps = latent_maps_of(model, sae, top.layer, batch.images.to(device))[:, lat].cpu()
        per_image.update(zip(batch.indices, maps, strict=True))
    h, w = top.grid
    out = {}
    for k, j in enumerate(latents):
        out[j] = torch.stack([per_image[i][k] if i in per_image else torch.zeros(h, w)
                              for i in top.images[j].tolist()])
    return out


def heatmap(latent_map: Tensor, rf: ReceptiveField, size: int) -> Tensor:
    """Latent map [H, W] -> [size, size]: unit (y, x) sits at its receptive-field centre."""
    h, w = latent_map.shape
    coords = (torch.arange(size, dtype=torch.float32) - rf.offset) / rf.stride
    gy = 2 * coords / max(h - 1, 1) - 1
    gx = 2 * coords / max(w - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(latent_map[None, None].float(), grid, mode="bilinear",
                         padding_mode="border", align_corners=True)[0, 0]


def crop_with_overlay(
    image01: Tensor, rf: ReceptiveField, y: int, x: int, latent_map: Tensor | None = None,
    vmax: float | None = None, tile: int = 128, alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """Receptive-field crop centred on unit (y, x); parts outside the image stay grey."""
    size = image01.shape[-1]
    img = image01.clone()
    if latent_map is not None:
        heat = heatmap(latent_map, rf, size)
        top = vmax if vmax and vmax > 0 else float(heat.max().clamp_min(1e-8))
        a = (heat / top).clamp(0, 1) * alpha
        red = torch.tensor(OVERLAY_RED).view(3, 1, 1)
        img = img * (1 - a) + red * a
    t, l_, b, r = rf.box(y, x, size)
    ct, cl, _, _ = rf.box(y, x)
    canvas = torch.full((3, rf.size, rf.size), 0.5)
    canvas[:, t - ct:b - ct, l_ - cl:r - cl] = img[:, t:b, l_:r]
    return to_pil(canvas).resize((tile, tile), Image.BILINEAR)


def strip(tiles: Sequence[Image.Image], gap: int = 2) -> Image.Image:
    if not tiles:
        return Image.new("RGB", (1, 1), (128, 128, 128))
    w, h = tiles[0].size
    out = Image.new("RGB", (len(tiles) * (w + gap) - gap, h), (255, 255, 255))
    for k, t in enumerate(tiles):
        out.paste(t, (k * (w + gap), 0))
    return out


def save_examples(
    top: TopExamples,
    latents: Sequence[int],
    source: ImageSource,
    out_dir: str | Path,
    variant,
    maps: dict[int, Tensor] | None = None,
    tile: int = 128,
    meta: dict | None = None,
) -> dict:
    """``<layer>_<latent>.png`` strips (best first) and ``index.json``; returns the index."""
    out = Path(out_dir)
    rf = receptive_field(variant, top.layer)
    cache: dict[int, Tensor] = {}
    index_latents = []
    for j in latents:
        entries = top.entries(j)
        vmax = max((e["value"] for e in entries), default=0.0)
        tiles = []
        for k, e in enumerate(entries):
            i = e["image_index"]
            if i not in cache:
                cache[i] = unit_image(source, i, variant)
            m = maps[j][k] if maps is not None else None
            tiles.append(crop_with_overlay(cache[i], rf, e["y"], e["x"], m, vmax, tile))
            e["box"] = list(rf.box(e["y"], e["x"], cache[i].shape[-1]))
        name = f"{top.layer}_{j:05d}.png"
        save_png(strip(tiles), out / name)
        index_latents.append({"latent": j, "file": name, "examples": entries})
    index = {"layer": top.layer, "n_top": top.n_top, "n_images": top.n_images,
             "receptive_field": {"size": rf.size, "stride": rf.stride, "offset": rf.offset},
             "latents": index_latents, **provenance(**(meta or {}))}
    write_json(out / "index.json", index)
    return index


def save_top_table(top: TopExamples, path: str | Path) -> None:
    """The whole top-N table (all latents) as safetensors, for circuits and the report."""
    from branchlens.artifacts import save_tensors

    ids = [top.image_ids.get(i, "") for i in range(max(top.image_ids, default=-1) + 1)]
    save_tensors(path, {"values": top.values, "images": top.images, "ys": top.ys, "xs": top.xs},
                 {"layer": top.layer, "grid": list(top.grid), "n_images": top.n_images,
                  "image_ids": ids})


def load_top_table(path: str | Path) -> TopExamples:
    from branchlens.artifacts import load_tensors

    t, meta = load_tensors(path)
    ids = {i: s for i, s in enumerate(meta.get("image_ids", [])) if s}
    return TopExamples(meta["layer"], t["values"], t["images"], t["ys"], t["xs"], ids,
                       tuple(meta["grid"]), int(meta["n_images"]))
