"""Image sources, robust decoding and per-variant preprocessing.

A source is a sequence of raw records ``(image_id, label, payload)``; the payload (a path, bytes
or a PIL image) is decoded in worker processes. Any file that cannot become an RGB image is
skipped and counted by reason, never raised and never turned into NaNs. Image ids are stable
(``source:relative/path`` or ``source:index``) so every stored activation can be traced back.

Source specs accepted by :func:`open_source`:
``embedded[:N]`` (photos shipped in scikit-image, expanded to N seeded views), a folder
(recursive; ImageNet ``<wnid>/`` subfolders or ``<wnid>_name.JPEG`` files give labels), a ``.txt``
file list (``path [label]`` per line), ``hf:NAME[:SPLIT][?image=KEY&label=KEY]`` (a hub
dataset, streamed under a limit, or a local ``save_to_disk``/imagefolder/parquet folder) and
``wds:SHARDS`` (WebDataset shards as ``webdataset`` expands them: braces, ``::``, URLs,
``pipe:``). The last two live in :mod:`branchlens.streaming`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Records and decoding live in branchlens.decode (shared with branchlens.streaming); they are
# re-exported here because `branchlens.data` is where callers have always found them.
from branchlens.decode import (  # noqa: F401
    FLIP_VIEW,
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    VIEW_SEP,
    BadImage,
    ImageSource,
    RawRecord,
    SkipStats,
    decode_image,
    decode_one,
    flipped,
    normalize,
    preprocess,
    resize_center_crop,
    text_id,
    to_unit_tensor,
    view_group,
)
from branchlens.variants import Variant, get_variant, label_wnids

_WNID = re.compile(r"^(n\d{8})")


class FolderSource(ImageSource):
    """All image files below a folder, sorted by relative path; ImageNet wnids give labels."""

    def __init__(self, root: str | Path, variant: str | Variant = "bvlc_googlenet"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        # dangling symlinks are kept so they are counted as "missing", not silently dropped
        files = sorted(p for p in self.root.rglob("*")
                       if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES | {""})
        self.files = files
        odd = [p for p in files if text_id(str(p)) != str(p)]
        if odd:
            warnings.warn(f"{len(odd)} file name(s) under {text_id(str(self.root))} are not "
                          f"valid UTF-8 (e.g. '{text_id(odd[0].name)}'); their image ids spell "
                          "the bad bytes as \\xNN", stacklevel=2)
        index = {w: i for i, w in enumerate(label_wnids())}  # ILSVRC indices, any variant
        self.labels = [self._label(p, index) for p in files]
        self.description = f"folder:{self.root.resolve()}"

    def _label(self, p: Path, index: dict[str, int]) -> int | None:
        for part in (p.parent.name, p.name):
            m = _WNID.match(part)
            if m and m.group(1) in index:
                return index[m.group(1)]
        return None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> RawRecord:
        p = self.files[i]
        return RawRecord(f"{self.root.name}/{p.relative_to(self.root)}", self.labels[i], str(p))


class FileListSource(ImageSource):
    """A text file of ``path [label]`` lines; relative paths are relative to the list file."""

    def __init__(self, list_file: str | Path):
        self.list_file = Path(list_file)
        self.items: list[tuple[str, int | None]] = []
        try:
            text = self.list_file.read_text()
        except UnicodeDecodeError:
            raise ValueError(f"{self.list_file} is neither an image folder nor a text file "
                             "list (`path [label]` lines)") from None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, _, label = line.rpartition(" ")
            if not path or not label.lstrip("-").isdigit():
                path, label = line, ""
            p = Path(path)
            if not p.is_absolute():
                p = self.list_file.parent / p
            self.items.append((str(p), int(label) if label else None))
        self.description = f"filelist:{self.list_file.resolve()}"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> RawRecord:
        path, label = self.items[i]
        return RawRecord(f"{self.list_file.name}:{i}", label, path)


EMBEDDED_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
    "ihc.png", "retina.jpg", "motorcycle_left.png", "motorcycle_right.png", "camera.png",
    "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png", "page.png",
)


class EmbeddedSource(ImageSource):
    """Real photographs shipped inside scikit-image, expanded to ``n`` seeded views.

    View 0 of each photo is the whole photo; further views are random crops (35-100 % of the
    shorter side) with random horizontal flips, so a demo can harvest enough varied positions
    without any download.
    """

    def __init__(self, n: int | None = None, seed: int = 0):
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        self.photos = [folder / f for f in EMBEDDED_PHOTOS if (folder / f).is_file()]
        if not self.photos:
            raise FileNotFoundError(f"no embedded photos found in {folder}")
        self.n = len(self.photos) if n is None else int(n)
        self.seed = seed
        self.description = f"embedded:{self.n}:seed{seed}"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> RawRecord:
        if not 0 <= i < self.n:
            raise IndexError(i)
        photo = self.photos[i % len(self.photos)]
        view = i // len(self.photos)
        return RawRecord(f"embedded:{photo.stem}{VIEW_SEP}view{view}", None,
                         _EmbeddedView(str(photo), view, self.seed + i))


@dataclass
class _EmbeddedView:
    path: str
    view: int
    seed: int

    def __call__(self) -> Image.Image:
        img = decode_image(self.path)
        if self.view == 0:
            return img
        rng = np.random.default_rng(self.seed)
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        img = img.crop((int(x0), int(y0), int(x0) + side, int(y0) + side))
        return ImageOps.mirror(img) if rng.random() < 0.5 else img


class FlipViews(ImageSource):
    """Every image of ``source`` followed by its horizontal mirror (2× the views).

    Mirrors are ids ``<id>#flip``, so the held-out split keeps both views of an image together.
    """

    def __init__(self, source: ImageSource):
        self.source = source
        self.description = f"{source.description}+flip"

    def __len__(self) -> int:
        return 2 * len(self.source)

    def __getitem__(self, i: int) -> RawRecord:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rec = self.source[i // 2]
        return rec if i % 2 == 0 else flipped(rec)


class _Truncated(ImageSource):
    """The first ``n`` records of a random-access source."""

    def __init__(self, source: ImageSource, n: int):
        self.source, self.n = source, min(n, len(source))
        self.description = source.description

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> RawRecord:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def open_source(spec: str | ImageSource, variant: str | Variant = "bvlc_googlenet",
                seed: int = 0, flip: bool = False, limit: int | None = None,
                image_key: str | None = None, label_key: str | None = None) -> ImageSource:
    """Parse a source spec (see module docstring) into an :class:`ImageSource`.

    Cheap and strict: a bad spec, a missing path or library, an unknown HF column fails here
    with one line, before any weights load. ``flip`` adds the horizontal mirror of every image
    as a second view; ``limit`` keeps the first N views (a streamed source reads no further).
    ``image_key``/``label_key`` name the columns of an ``hf:`` dataset.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if flip:
        base = open_source(spec, variant, seed, limit=None if limit is None else -(-limit // 2),
                           image_key=image_key, label_key=label_key)
        from branchlens.streaming import FlipStream, StreamSource

        src: ImageSource = (FlipStream(base, limit) if isinstance(base, StreamSource)
                            else FlipViews(base))
    else:
        src = _open(spec, variant, seed, limit, image_key, label_key)
    if limit is not None and not _is_stream(src):
        src = _Truncated(src, limit)
    return src


def _is_stream(src: ImageSource) -> bool:
    from branchlens.streaming import StreamSource

    return isinstance(src, StreamSource)


def _open(spec: str | ImageSource, variant: str | Variant, seed: int, limit: int | None,
          image_key: str | None, label_key: str | None) -> ImageSource:
    if isinstance(spec, ImageSource):
        return spec
    if (image_key or label_key) and not spec.startswith("hf:"):
        raise ValueError("--image-key/--label-key apply to hf: sources only")
    if spec == "embedded" or spec.startswith("embedded:"):
        n = spec.partition(":")[2]
        if n and not n.isdigit():
            raise ValueError(f"embedded:N wants a count, got {spec!r}")
        return EmbeddedSource(int(n) if n else None, seed=seed)
    if spec.startswith("hf:"):
        from branchlens.streaming import open_hf

        return open_hf(spec[3:], variant, limit, image_key, label_key)
    if spec.startswith("wds:"):
        from branchlens.streaming import WebDatasetSource

        return WebDatasetSource(spec[4:], limit)
    p = Path(spec).expanduser()
    if p.is_dir():
        return FolderSource(p, variant)
    if p.suffix == ".tar" and p.is_file():
        from branchlens.streaming import WebDatasetSource

        return WebDatasetSource(str(p), limit)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"image source {spec!r} is a single image: give the folder that holds "
                         "it, or a .txt file list naming it")
    if p.is_file():
        return FileListSource(p)
    raise FileNotFoundError(
        f"image source {spec!r} is not a folder, a .txt file list, a .tar shard, "
        "'embedded[:N]', 'hf:NAME[:SPLIT]' or 'wds:SHARDS'")


def split_for_rank(src: ImageSource, indices: Sequence[int], world: int, rank: int
                   ) -> list[int]:
    """This rank's share of ``indices``: contiguous blocks; for a streamed source whole units
    (shards), so no rank reads another rank's shard."""
    indices = [int(i) for i in indices]
    if world <= 1:
        return indices
    if not _is_stream(src):
        return [int(i) for i in np.array_split(np.asarray(indices, np.int64), world)[rank]]
    by_unit: dict[int, list[int]] = {}
    for i in indices:
        by_unit.setdefault(src.unit_of(i), []).append(i)
    units = sorted(by_unit)
    total, done, mine = len(indices), 0, []
    for u in units:  # balanced contiguous blocks of units by their image counts
        owner = min(world - 1, (2 * done + len(by_unit[u])) * world // (2 * total))
        if owner == rank:
            mine += by_unit[u]
        done += len(by_unit[u])
    return mine


# -- batching -----------------------------------------------------------------------------------

@dataclass
class Batch:
    indices: list[int]  # positions in the source
    image_ids: list[str]
    labels: list[int | None]
    images: torch.Tensor  # [B, 3, H, W] model input
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (index, id, reason)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, indices: Sequence[int], variant: Variant,
                 paper_compat: bool, max_pixels: int):
        self.source, self.indices, self.variant = source, indices, variant
        self.paper_compat, self.max_pixels = paper_compat, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        return decode_one(i, self.source[i], self.variant, self.paper_compat, self.max_pixels)


def _collate(items):
    return items


def iter_batches(
    source: ImageSource,
    variant: str | Variant,
    batch_size: int = 32,
    workers: int = 0,
    indices: Sequence[int] | None = None,
    paper_compat: bool = False,
    skips: SkipStats | None = None,
    max_pixels: int = MAX_PIXELS,
    with_skips: bool = False,
) -> Iterator[Batch]:
    """Decoded, preprocessed batches; bad inputs are counted in ``skips``.

    Random-access sources come in index order. A streamed source is read unit by unit, each
    DataLoader worker reading its own units, so batches of different workers interleave; with
    ``with_skips`` every batch lists its skipped indices (a batch may then hold only skips),
    which is what an order-independent consumer needs.
    """
    v = get_variant(variant)
    indices = list(range(len(source))) if indices is None else list(indices)
    skips = skips if skips is not None else SkipStats()
    if _is_stream(source):
        from branchlens.streaming import StreamedDecode

        ds: torch.utils.data.Dataset = StreamedDecode(source, indices, v, paper_compat,
                                                      max_pixels)
        workers = min(workers, ds.n_units)
    else:
        ds = _Decoded(source, indices, v, paper_compat, max_pixels)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        persistent_workers=False, prefetch_factor=4 if workers else None)
    for items in loader:
        good, bad = [], []
        for i, image_id, label, x, reason in items:
            if reason is not None:
                skips.add(reason, image_id)
                bad.append((i, image_id, reason))
            else:
                good.append((i, image_id, label, x))
        if good or (with_skips and bad):
            images = torch.stack([g[3] for g in good]) if good else torch.empty(0)
            yield Batch([g[0] for g in good], [g[1] for g in good], [g[2] for g in good],
                        images, bad)
