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

import io
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from branchlens.variants import Preprocessing, Variant, get_variant, label_wnids

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
MAX_PIXELS = 89_478_485  # PIL's own default bomb limit, made explicit and configurable
MAX_FILE_BYTES = 256 * 2**20  # no real image file is larger; /dev/zero-like files are refused


def text_id(image_id: str) -> str:
    """``image_id`` as valid Unicode: bytes of a file name that are not UTF-8 (surrogate
    escapes) are spelled ``\\xNN``, so every id can go into JSON, CSV and HTML."""
    if image_id.isascii():
        return image_id
    try:
        raw = image_id.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name produces
        raw = image_id.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


@dataclass
class RawRecord:
    image_id: str
    label: int | None
    payload: Any  # str path | bytes | PIL.Image.Image | callable returning one of these

    def __post_init__(self) -> None:
        self.image_id = text_id(self.image_id)  # the one place every source's ids pass


VIEW_SEP = "#"  # "<image id>#<view>": a derived view (flip, crop) of one underlying image
FLIP_VIEW = f"{VIEW_SEP}flip"  # FlipViews' mirror of an image
_CROP_VIEW = re.compile(rf"{VIEW_SEP}view\d+\Z")  # EmbeddedSource's views of one photo


def view_group(image_id: str) -> str:
    """The underlying image of a view id: views of one image must share a train/held-out side.

    Only the suffixes branchlens appends are views: ``x#1.jpg`` and ``x#2.jpg`` of a folder
    are two images."""
    return _CROP_VIEW.sub("", image_id.removesuffix(FLIP_VIEW))


class BadImage(Exception):
    """An input that cannot be decoded; ``reason`` is the counter key in the skip summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class SkipStats:
    """Counts of skipped inputs by reason, with a few example ids for the summary."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, image_id: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(image_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no images skipped"
        parts = [f"{n} {r} (e.g. {', '.join(self.examples[r])})" for r, n in
                 self.counts.most_common()]
        return f"skipped {self.total} images: " + "; ".join(parts)


# -- decoding -----------------------------------------------------------------------------------

def decode_image(payload: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any supported payload -> an RGB PIL image with EXIF orientation applied.

    Raises :class:`BadImage` with a reason of ``empty``, ``unreadable``, ``not_image``,
    ``truncated``, ``too_large``, ``not_regular_file`` or ``missing``.
    """
    if callable(payload):
        payload = payload()
    if isinstance(payload, Image.Image):
        img = payload
    else:
        if isinstance(payload, (str, Path)):
            data = _read_file(Path(payload))
        else:
            data = bytes(payload)
        if not data:
            raise BadImage("empty", "zero bytes")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadImage("too_large", str(e)) from e
        except Exception as e:
            raise BadImage("not_image", str(e)) from e
    if img.width * img.height > max_pixels:
        raise BadImage("too_large", f"{img.width}x{img.height} > {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or "broken data" in msg else "unreadable"
        raise BadImage(reason, msg) from e
    return img


def _read_file(p: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_FILE_BYTES`. Anything else (a FIFO,
    a device, a folder, also behind a symlink) is refused unopened: reading it could hang or
    fill the memory."""
    try:
        st = os.stat(p)  # follows symlinks
    except FileNotFoundError as e:
        raise BadImage("missing", str(p)) from e
    except OSError as e:
        raise BadImage("unreadable", f"{p}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_regular_file", str(p))
    if st.st_size > MAX_FILE_BYTES:
        raise BadImage("too_large", f"{p}: {st.st_size} bytes > {MAX_FILE_BYTES}")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # a file that grew since the stat stays capped
    except FileNotFoundError as e:
        raise BadImage("missing", str(p)) from e
    except OSError as e:
        raise BadImage("unreadable", f"{p}: {e}") from e
    if len(data) > MAX_FILE_BYTES:
        raise BadImage("too_large", f"{p}: more than {MAX_FILE_BYTES} bytes")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB; alpha is composited on white, 16-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        a = a / (hi if hi > 0 else 1.0) * 255.0
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


# -- preprocessing ------------------------------------------------------------------------------

def resize_center_crop(img: Image.Image, resize: int = 256, crop: int = 224) -> Image.Image:
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float tensor [3, H, W] in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, variant: str | Variant, paper_compat: bool = False) -> torch.Tensor:
    """[0, 1] RGB (..., 3, H, W) -> model input for the variant.

    ``paper_compat`` reproduces the paper's harvest bug: [0, 1] RGB fed to a model that expects
    ``x*255 - 117`` (only meaningful for ``inception5h``).
    """
    if paper_compat:
        return x
    p: Preprocessing = get_variant(variant).preprocessing
    if p.bgr:
        x = x.flip(-3)
    mean = torch.tensor(p.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * p.scale - mean


def preprocess(
    img: Image.Image, variant: str | Variant, paper_compat: bool = False
) -> torch.Tensor:
    p = get_variant(variant).preprocessing
    return normalize(to_unit_tensor(resize_center_crop(img, p.resize, p.crop)), variant,
                     paper_compat)


# -- sources ------------------------------------------------------------------------------------

class ImageSource(Sequence):
    """A sized, indexable collection of raw records."""

    description: str = ""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> RawRecord:  # pragma: no cover - abstract
        raise NotImplementedError


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
        return rec if i % 2 == 0 else _flipped(rec)


def _flipped(rec: RawRecord) -> RawRecord:
    return RawRecord(f"{rec.image_id}{FLIP_VIEW}", rec.label, _Mirrored(rec.payload))


@dataclass
class _Mirrored:
    payload: Any

    def __call__(self) -> Image.Image:
        return ImageOps.mirror(decode_image(self.payload))


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


def _decode_one(i: int, rec: RawRecord, variant: Variant, paper_compat: bool,
                max_pixels: int) -> tuple:
    try:
        img = decode_image(rec.payload, max_pixels)
        x = preprocess(img, variant, paper_compat)
        if not torch.isfinite(x).all():
            raise BadImage("non_finite", rec.image_id)
        return i, rec.image_id, rec.label, x, None
    except BadImage as e:
        return i, rec.image_id, rec.label, None, e.reason
    except Exception as e:  # a decoder bug on one file must not end a long harvest
        return i, rec.image_id, rec.label, None, f"error:{type(e).__name__}"


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, indices: Sequence[int], variant: Variant,
                 paper_compat: bool, max_pixels: int):
        self.source, self.indices, self.variant = source, indices, variant
        self.paper_compat, self.max_pixels = paper_compat, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        return _decode_one(i, self.source[i], self.variant, self.paper_compat, self.max_pixels)


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
