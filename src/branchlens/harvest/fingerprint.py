"""What a harvest read: a cheap fingerprint of a local image source and the content of each image.

The fingerprint (file names, sizes and modification times; no file is read) goes into the store's
config, so a re-run on changed data is noticed and starts clean, and a later stage that reads
images again by their index (examples, ``Latent.top_images``) refuses a folder that changed
instead of labelling one image with another's statistics. Names and sizes alone identify a moved
or copied folder (a copy gets new mtimes), which is what ``--source NEWPATH`` is checked against.

The content digest of each stored image (sha256 of its file, read while it is still in the page
cache) finds byte-identical files under different names: they are reported and kept on one side
of the train/held-out split.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from branchlens.data import FileListSource, FolderSource, ImageSource

CONTENT_CHARS = 32  # hex digits of a content digest kept per image (128 bits)
_READ = 1 << 20


def local_files(src: ImageSource) -> list[tuple[str, Path]] | None:
    """(name, path) of every file a folder or file-list source reads, through its flip and
    limit wrappers; ``None`` for sources without local files (embedded, hf:, wds:)."""
    while isinstance(getattr(src, "source", None), ImageSource):
        src = src.source  # FlipViews, the first N of a source
    if isinstance(src, FolderSource):
        return [(p.relative_to(src.root).as_posix(), p) for p in src.files]
    if isinstance(src, FileListSource):
        return [(f"{path} {label}", Path(path)) for path, label in src.items]
    return None


def source_fingerprint(src: ImageSource) -> dict[str, Any] | None:
    """``{"files", "bytes", "names", "stat"}`` of a local source: counts and two sha256s, over
    names and sizes, and over names, sizes and mtimes. ``None`` when it has no local files."""
    files = local_files(src)
    if files is None:
        return None
    names, stat = hashlib.sha256(), hashlib.sha256()
    total = 0
    for name, path in files:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # dangling link, removed file: part of what changed
            size, mtime = -1, 0
        total += max(size, 0)
        entry = os.fsencode(name) + f"\0{size}".encode()
        names.update(entry + b"\n")
        stat.update(entry + f"\0{mtime}\n".encode())
    return {"files": len(files), "bytes": total, "names": names.hexdigest(),
            "stat": stat.hexdigest()}


def spec_fingerprint(spec: Any, variant: str = "bvlc_googlenet") -> dict[str, Any] | None:
    """The fingerprint of a source spec that names a local folder or file list (opened only to
    list it; nothing remote is contacted, no command runs); ``None`` for any other spec."""
    from branchlens.data import IMAGE_SUFFIXES

    if not isinstance(spec, str) or spec.startswith(("embedded", "hf:", "wds:")):
        return None
    p = Path(spec).expanduser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the harvest already warned about odd file names
        if p.is_dir():
            return source_fingerprint(FolderSource(p, variant))
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES | {".tar"}:
            try:
                return source_fingerprint(FileListSource(p))
            except ValueError:
                return None
    return None


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe_change(then: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """What changed between the fingerprint recorded at the harvest and the current one, in a
    few words; ``None`` when nothing did (or either is unknown)."""
    if not then or not now or then.get("stat") == now.get("stat"):
        return None
    if then.get("names") == now.get("names"):
        return (f"same {now['files']} file names and sizes, but files were rewritten "
                "(modification times differ)")
    if then.get("files") == now.get("files"):
        return (f"{now['files']} files as at the harvest, but some names or sizes differ "
                "(a file replaced, renamed, or one added and one removed)")
    return (f"{now['files']} files ({_size(now['bytes'])}) now, {then['files']} "
            f"({_size(then['bytes'])}) at the harvest")


def same_files(then: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    """Whether ``now`` lists the files of ``then`` (same names and sizes): a moved or copied
    folder, whatever its mtimes."""
    return bool(then and now and then.get("names") == now.get("names"))


def record_digest(src: ImageSource, index: int) -> str | None:
    """The content digest of a local source's image ``index``: sha256 of its file; ``None`` for
    derived views (a mirror) and for sources without local files."""
    payload = src[index].payload
    if not isinstance(payload, (str, Path)):
        return None
    h = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.stat(payload).st_mode):
            return None  # swapped for a FIFO or a device since it was decoded: never opened
        with open(payload, "rb") as f:
            for chunk in iter(lambda: f.read(_READ), b""):
                h.update(chunk)
    except OSError:
        return None  # gone since it was decoded: no claim about its content
    return h.hexdigest()[:CONTENT_CHARS]
