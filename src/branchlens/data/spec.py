"""Source specs: the one parser from a spec string to an opened :class:`ImageSource`.

The spec forms are listed in :mod:`branchlens.data`. Opening is cheap and strict: a bad spec,
a missing path or library fails here in one line, before any weights load.
"""

from __future__ import annotations

from pathlib import Path

from branchlens.data.hf import open_hf
from branchlens.data.records import IMAGE_SUFFIXES, ImageSource
from branchlens.data.sources import (
    EmbeddedSource,
    FileListSource,
    FlipViews,
    FolderSource,
    Truncated,
)
from branchlens.data.streams import FlipStream, StreamSource, is_stream
from branchlens.data.wds import WebDatasetSource
from branchlens.variants import Variant


def open_source(spec: str | ImageSource, variant: str | Variant = "bvlc_googlenet",
                seed: int = 0, flip: bool = False, limit: int | None = None,
                image_key: str | None = None, label_key: str | None = None) -> ImageSource:
    """Parse a source spec (see :mod:`branchlens.data`) into an :class:`ImageSource`.

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
        src: ImageSource = (FlipStream(base, limit) if isinstance(base, StreamSource)
                            else FlipViews(base))
    else:
        src = _open(spec, variant, seed, limit, image_key, label_key)
    if limit is not None and not is_stream(src):
        src = Truncated(src, limit)
    return src


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
        return open_hf(spec[3:], variant, limit, image_key, label_key)
    if spec.startswith("wds:"):
        return WebDatasetSource(spec[4:], limit)
    p = Path(spec).expanduser()
    if p.is_dir():
        return FolderSource(p, variant)
    if p.suffix == ".tar" and p.is_file():
        return WebDatasetSource(str(p), limit)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"image source {spec!r} is a single image: give the folder that holds "
                         "it, or a .txt file list naming it")
    if p.is_file():
        return FileListSource(p)
    raise FileNotFoundError(
        f"image source {spec!r} is not a folder, a .txt file list, a .tar shard, "
        "'embedded[:N]', 'hf:NAME[:SPLIT]' or 'wds:SHARDS'")
