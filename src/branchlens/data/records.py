"""Image records: what every source kind yields and shares (ids, views, skips, the source type).

A record is ``(image_id, label, payload)``; the payload (a path, bytes, a PIL image or a callable
returning one) is decoded later, in worker processes (:mod:`branchlens.data.decode`). Image ids
are stable (``source:relative/path`` or ``source:index``) and valid text, so every stored
activation can be traced back to its image.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


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


class ImageSource(Sequence):
    """A sized, indexable collection of raw records."""

    description: str = ""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> RawRecord:  # pragma: no cover - abstract
        raise NotImplementedError
