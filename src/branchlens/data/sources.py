"""Random-access image sources: a folder, a text file list, scikit-image's photos, and views.

Each is a sequence of :class:`~branchlens.data.records.RawRecord`; the spec parser
(:mod:`branchlens.data.spec`) picks one. Streamed sources (``hf:``, ``wds:``) are in
:mod:`branchlens.data.streams`, :mod:`~branchlens.data.wds` and :mod:`~branchlens.data.hf`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from branchlens.data.decode import decode_image, flipped
from branchlens.data.records import IMAGE_SUFFIXES, VIEW_SEP, ImageSource, RawRecord, text_id
from branchlens.variants import Variant, label_wnids

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


class Truncated(ImageSource):
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
