"""The examples gallery of *every* latent: each held-out image once, plus sparse latent maps.

A 16× SAE has ~8–13 k latents per layer; a dozen crops of ≥ 96 px per latent drawn here would be
~10⁵ tiles and hundreds of MB per layer. The top lists of all latents together name only the
few hundred (at most a few ten thousand) held-out images they were taken from, so each of those
is stored once (``images/<index>.jpg``, the 224 px crop the network saw) with, per latent and
example, the latent's map on that image in sparse form (TopK codes are zero almost everywhere).
The report draws the receptive-field crops and the red overlay in the browser.

Per latent the gallery holds the best view of up to ``size`` *distinct* images (an image and its
mirror count once, as the analysis' top images do), so the candidates come from a top table of
``2 · size`` views. A second streaming pass visits each owed image once and keeps, for every
(latent, example) it owes, the nonzero positions and values of the latent's map.

Files in ``RUN/viz/examples/<layer>/``:

- ``gallery_maps.safetensors``: ``images, ys, xs, values`` [n_latents, size] (best first; image
  -1 = empty) and the maps, CSR-style: entry ``e = latent * size + slot`` owns
  ``pos[offsets[e]:offsets[e + 1]]`` (flat unit ``y * W + x``) and ``val[...]``;
- ``images/<index:06d>.jpg``; ``gallery.json`` (written last: its presence means complete):
  ``size, grid, image_size, receptive_field, image_files`` [{index, file, id, label}], counts.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from branchlens.artifacts import atomic_path, provenance, save_tensors, write_json
from branchlens.data import VIEW_SEP, ImageSource, iter_batches
from branchlens.layout import RunLayout
from branchlens.progress import progress
from branchlens.viz.examples import CodeCache, TopExamples, latent_maps_of, unit_image
from branchlens.viz.latents import SAELike
from branchlens.viz.receptive import ReceptiveField, receptive_field

GALLERY = "gallery.json"
MAPS = "gallery_maps.safetensors"
IMAGES = "images"
GALLERY_SIZE = 12  # examples per latent (Microscope-style dashboards show a dozen or more)
JPEG_QUALITY = 85  # ~15–25 kB for a 224 px photograph
IMAGE_NAME = re.compile(r"\d{6,}\.jpg")
TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")  # artifacts.atomic_path's temp files
SHEET_NAME = re.compile(r"sprites_\d{3,}\.jpg")  # the sprite sheets earlier versions wrote


@dataclass
class Gallery:
    """Per latent, the examples the report shows: [n_latents, size], best first, image -1 =
    empty (a latent that fired on fewer distinct images)."""

    layer: str
    images: Tensor
    ys: Tensor
    xs: Tensor
    values: Tensor

    @property
    def size(self) -> int:
        return self.images.shape[1]


def base_id(image_id: str) -> str:
    """The underlying image of a view (``x.jpg#flip`` -> ``x.jpg``)."""
    return image_id.split(VIEW_SEP, 1)[0]


def choose_gallery(top: TopExamples, size: int = GALLERY_SIZE) -> Gallery:
    """The best view of up to ``size`` distinct underlying images per latent, positive values
    only, in the order of ``top`` (which should hold ``2 · size`` views per latent)."""
    n = top.values.shape[0]
    out = {k: torch.full((n, size), -1, dtype=torch.long) for k in ("images", "ys", "xs")}
    values = torch.zeros(n, size)
    base = {i: base_id(s) for i, s in top.image_ids.items()}
    vals, imgs = top.values.tolist(), top.images.tolist()
    ys, xs = top.ys.tolist(), top.xs.tolist()
    for j in range(n):
        seen: set[str] = set()
        s = 0
        for k, (v, i) in enumerate(zip(vals[j], imgs[j], strict=True)):
            if s == size or i < 0 or not v > 0:
                break
            b = base.get(i, str(i))
            if b in seen:
                continue
            seen.add(b)
            out["images"][j, s], out["ys"][j, s], out["xs"][j, s] = i, ys[j][k], xs[j][k]
            values[j, s] = v
            s += 1
    return Gallery(top.layer, out["images"], out["ys"], out["xs"], values)


class GalleryWriter:
    """Collects the owed images and sparse maps of a :class:`Gallery`, then writes the files.

    ``add`` takes one image's [0, 1] crop and every latent's map on it [n_latents, H, W]; only
    the (latent, slot) entries that show that image are kept."""

    def __init__(self, out_dir: str | Path, gallery: Gallery, rf: ReceptiveField,
                 grid: tuple[int, int], image_size: int, quality: int = JPEG_QUALITY):
        self.out, self.g, self.rf = Path(out_dir), gallery, rf
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size, self.quality = image_size, quality
        if self.grid[0] * self.grid[1] > np.iinfo(np.int16).max:
            raise ValueError(f"a {self.grid} grid does not fit the gallery's int16 positions")
        self.owed: dict[int, list[tuple[int, int]]] = {}
        for j, s in (gallery.images >= 0).nonzero().tolist():
            self.owed.setdefault(int(gallery.images[j, s]), []).append((j, s))
        self.records: dict[int, dict] = {}
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (entry, pos, val) per image

    @property
    def wanted(self) -> list[int]:
        return sorted(self.owed)

    def add(self, index: int, image01: Tensor, image_id: str, label: int | None,
            maps: Tensor) -> None:
        slots = self.owed.get(int(index))
        index = int(index)
        if not slots or index in self.records:
            return
        name = f"{IMAGES}/{int(index):06d}.jpg"
        arr = (image01.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        with atomic_path(self.out / name) as tmp:
            Image.fromarray(arr).save(tmp, format="JPEG", quality=self.quality)
        self.records[index] = {"index": int(index), "file": name, "id": image_id,
                               "label": None if label is None else int(label)}
        js = torch.tensor([j for j, _ in slots])
        ss = torch.tensor([s for _, s in slots])
        m = maps[js].float()
        r, y, x = (m > 0).nonzero(as_tuple=True)
        self.parts.append(((js[r] * self.g.size + ss[r]).to(torch.int64),
                           (y * self.grid[1] + x).to(torch.int16), m[r, y, x].half()))

    def finish(self, n_images: int, meta: dict | None = None) -> dict:
        """Write the maps and ``gallery.json``; entries whose image never came (unreadable
        now) are emptied and counted."""
        g = self.g
        missing = [i for i in self.owed if i not in self.records]
        kept = (g.images >= 0) & ~torch.isin(g.images, torch.tensor(missing, dtype=torch.long))
        # close the gaps: a row keeps its order, empty slots (-1) only at its end
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)
        slot = torch.argsort(order, dim=1)  # old slot -> new slot
        for t in (g.images, g.ys, g.xs, g.values):
            t.copy_(t.gather(1, order))
        gone = ~kept.gather(1, order)
        for t in (g.images, g.ys, g.xs):
            t[gone] = -1
        g.values[gone] = 0.0
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int16),
                 torch.zeros(0, dtype=torch.float16))
        entry, pos, val = (torch.cat([p[k] for p in self.parts]) if self.parts else empty[k]
                           for k in range(3))
        entry = entry // g.size * g.size + slot.flatten()[entry]
        order = torch.argsort(entry, stable=True)
        pos, val = pos[order], val[order]
        counts = torch.bincount(entry, minlength=g.images.numel())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        save_tensors(self.out / MAPS, {"images": g.images, "ys": g.ys, "xs": g.xs,
                                       "values": g.values, "offsets": offsets, "pos": pos,
                                       "val": val},
                     {"layer": g.layer, "size": g.size, "grid": list(self.grid)})
        keep = {r["file"].rsplit("/", 1)[1] for r in self.records.values()}
        for p in (self.out / IMAGES).glob("*.jpg"):  # a previous gallery's images
            if IMAGE_NAME.fullmatch(p.name) and p.name not in keep:
                p.unlink()
        doc = {"layer": g.layer, "size": g.size, "grid": list(self.grid),
               "image_size": self.image_size,
               "receptive_field": {"size": self.rf.size, "stride": self.rf.stride,
                                   "offset": self.rf.offset},
               "n_latents": int(g.images.shape[0]),
               "with_examples": int((g.images[:, 0] >= 0).sum()), "n_images": n_images,
               "missing_images": len(missing), "maps": MAPS,
               "image_files": [self.records[i] for i in sorted(self.records)],
               "order": "best first; one view per underlying image; entry latent*size+slot "
                        "owns pos/val[offsets[e]:offsets[e+1]] (pos = y*W + x)",
               **provenance(**(meta or {}))}
        write_json(self.out / GALLERY, doc)
        return doc


def save_gallery(
    model: nn.Module, sae: SAELike, top: TopExamples, source: ImageSource, out_dir: str | Path,
    variant, *, size: int = GALLERY_SIZE, batch_size: int = 16, meta: dict | None = None,
    show_progress: bool = True, codes: CodeCache | None = None,
) -> dict:
    """The gallery of every latent of ``top`` (see the module doc): one pass over the images
    its top lists name, every latent map computed once per image (or taken from ``codes``)."""
    from branchlens.variants import get_variant

    gallery = choose_gallery(top, size)
    writer = GalleryWriter(out_dir, gallery, receptive_field(variant, top.layer), top.grid,
                           get_variant(variant).preprocessing.crop)
    device = next(model.parameters()).device
    wanted = writer.wanted
    with progress(len(wanted), f"gallery {top.layer}", "img", disable=not show_progress) as bar:
        if codes is not None:
            for ids, names, labels, maps in codes.batches(wanted):
                for b, i in enumerate(ids):
                    writer.add(i, unit_image(source, i, variant), names[b], labels[b], maps[b])
                bar.update(len(ids))
            return writer.finish(top.n_images, meta)
        for batch in iter_batches(source, model.variant, batch_size, 0, indices=wanted):
            maps = latent_maps_of(model, sae, top.layer, batch.images.to(device)).cpu()
            for b, i in enumerate(batch.indices):
                writer.add(i, unit_image(source, i, variant), batch.image_ids[b],
                           batch.labels[b], maps[b])
            bar.update(len(batch.indices))
    return writer.finish(top.n_images, meta)


def load_gallery(out_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``gallery.json`` and the verified tensors of ``gallery_maps.safetensors``."""
    import json

    from branchlens.artifacts import load_tensors

    out = Path(out_dir)
    doc = json.loads((out / GALLERY).read_text())
    tensors, _ = load_tensors(out / MAPS)
    return doc, tensors


def entry_map(tensors: dict[str, Tensor], grid: Sequence[int], latent: int, slot: int) -> Tensor:
    """The dense [H, W] map of one gallery entry (zeros where the latent is silent)."""
    size = tensors["images"].shape[1]
    e = latent * size + slot
    a, b = int(tensors["offsets"][e]), int(tensors["offsets"][e + 1])
    m = torch.zeros(int(grid[0]) * int(grid[1]))
    m[tensors["pos"][a:b].long()] = tensors["val"][a:b].float()
    return m.view(int(grid[0]), int(grid[1]))


def sweep_leftovers(out_dir: str | Path) -> list[str]:
    """Remove what a killed examples stage can leave in its folder (called under the run lock,
    so no live writer owns them): temp files of atomic writes, the tile buffers of earlier
    versions (``tmp*/tiles.npy``), and an incomplete or superseded gallery index; also the sprite
    sheets earlier versions wrote (the gallery replaces them). Returns the names removed."""
    out = Path(out_dir)
    gone: list[str] = []
    if not out.is_dir():
        return gone
    for folder in (out, out / IMAGES):
        for p in folder.glob(".*.tmp") if folder.is_dir() else ():
            if TEMP_NAME.fullmatch(p.name) and p.is_file():
                p.unlink()
                gone.append(str(p.relative_to(out)))
    for p in out.glob("tmp*"):
        if p.is_dir() and not p.is_symlink() and {c.name for c in p.iterdir()} <= {"tiles.npy"}:
            shutil.rmtree(p)
            gone.append(p.name)
    for p in [out / GALLERY, out / "sprites.json", *out.glob("sprites_*.jpg")]:
        if p.is_file() and (p.name in (GALLERY, "sprites.json") or SHEET_NAME.fullmatch(p.name)):
            p.unlink()
            gone.append(p.name)
    return gone


def heldout_indices(run_dir: str | Path, sae) -> tuple[list[int] | None, str]:
    """The SAE's held-out images of the run's store (as the analysis uses them), or None when
    the run has no store (then the caller uses the whole source)."""
    store_dir = RunLayout(run_dir).store_dir
    if not (store_dir / "manifest.json").is_file():
        return None, "no store: all images of the source"
    from branchlens.store import ActivationStore
    from branchlens.train.sampling import heldout_images

    held, note = heldout_images(sae, ActivationStore.open(store_dir, verify=False))
    return sorted(int(i) for i in held), note
