"""Streamed image sources: WebDataset shards and Hugging Face datasets, read by their libraries.

A :class:`StreamSource` is a list of *units* (one tar shard; one block of streamed rows), each
read front to back and never by random access. The store records images by a dense global index,
the position in the concatenation of the units, so each unit's size must be known before the
harvest: tar shards are counted once (headers only, cached per local file) and counting stops at
``limit``. Ranks and DataLoader workers take whole units (:func:`branchlens.data.split_for_rank`,
:func:`unit_share`), so no sample is read, decoded or stored twice.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from branchlens.decode import (
    IMAGE_SUFFIXES,
    BadImage,
    ImageSource,
    RawRecord,
    decode_one,
    flipped,
)
from branchlens.variants import Variant, label_wnids

log = logging.getLogger("branchlens.data")

HF_UNIT_ROWS = 1000  # rows per unit of a streamed HF split (the split granularity of ranks)
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # pipe:, http(s):, s3:, gs:, hf: ...


def missing_extra(lib: str, extra: str) -> ImportError:
    return ImportError(f"{lib} is not installed: pip install 'branchlens[{extra}]'")


class StreamError(OSError):
    """A unit of a streamed source (a shard, a block of rows) that cannot be read, in one
    English line: the source's spec, the shard or rows, and the cause."""


class StreamSource(ImageSource):
    """Units read in order; ``unit_sizes`` give the global index of every record."""

    _sizes: list[int] | None = None

    @property
    def n_units(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def count_units(self) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def unit_records(self, u: int) -> Iterator[RawRecord]:  # pragma: no cover - abstract
        """Records of unit ``u`` in order (at most ``unit_sizes[u]`` of them)."""
        raise NotImplementedError

    @property
    def unit_sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = self.count_units()
        return self._sizes

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for n in self.unit_sizes:
            out.append(total)
            total += n
        return out

    def unit_of(self, i: int) -> int:
        return bisect.bisect_right(self.offsets, i) - 1

    def __len__(self) -> int:
        return sum(self.unit_sizes)

    def __getitem__(self, i: int) -> RawRecord:
        """Slow (reads the unit up to ``i``): for a few records, never for a harvest."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        u = self.unit_of(i)
        for pos, rec in enumerate(self.unit_records(u)):
            if pos == i - self.offsets[u]:
                return rec
        raise IndexError(f"{self.description}: record {i} is past the end of its unit")


def unit_share(units: Sequence[int]) -> list[int]:
    """The units of this DataLoader worker: every ``num_workers``-th, as webdataset splits."""
    info = torch.utils.data.get_worker_info()
    return list(units) if info is None else list(units[info.id::info.num_workers])


# -- WebDataset ---------------------------------------------------------------------------------

@dataclass
class _NoImage:
    key: str

    def __call__(self) -> Any:
        raise BadImage("no_image", f"sample {self.key} has no image member")


def _is_local(url: str) -> bool:
    return not _REMOTE.match(url) or url.startswith("file:")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file:")).expanduser()


class WebDatasetSource(StreamSource):
    """WebDataset shards, as ``webdataset`` expands and opens them (braces, ``::``, URLs,
    ``pipe:``). Samples are webdataset's key groups; the first image member is the image, a
    ``cls`` member the label. A sample without an image is a counted skip, not a shift of ids.
    """

    def __init__(self, spec: str, limit: int | None = None):
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise missing_extra("webdataset", "webdataset") from None
        urls: list[str] = []
        for url in expand_urls(spec):
            if _is_local(url) and not _local_path(url).exists() and glob.has_magic(url):
                urls += sorted(glob.glob(str(_local_path(url))))  # a shell-style pattern
            else:
                urls.append(url)
        if not urls:
            raise FileNotFoundError(f"wds:{spec} names no shard")
        missing = [u for u in urls if _is_local(u) and not _local_path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"wds:{spec}: {len(missing)} of {len(urls)} shards not found "
                                    f"(first: {missing[0]})")
        twice = next((u for u, n in Counter(urls).items() if n > 1), None)
        if twice is not None:
            raise ValueError(f"wds:{spec} names shard {twice} twice; its images would be "
                             "stored twice under the same ids")
        self.urls, self.limit = urls, limit
        self.names = shard_names(urls)
        self.description = f"wds:{spec}"

    @property
    def n_units(self) -> int:
        return len(self.urls)

    def count_units(self) -> list[int]:
        sizes, total = [], 0
        for url in self.urls:
            if self.limit is not None and total >= self.limit:
                break
            try:
                n = count_shard(url)
            except StreamError as e:
                raise StreamError(f"{self.description}: {e}") from None
            if self.limit is not None:
                n = min(n, self.limit - total)
            sizes.append(n)
            total += n
        return sizes

    def unit_records(self, u: int) -> Iterator[RawRecord]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        url, size, name = self.urls[u], self.unit_sizes[u], self.names[u]
        try:
            with _open_shard(url) as stream:
                samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
                for pos, sample in enumerate(samples):
                    if pos >= size:
                        return
                    key = sample["__key__"]
                    image = next((v for k, v in sample.items() if not k.startswith("__")
                                  and f".{k.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES), None)
                    yield RawRecord(f"wds:{name}:{key}", _cls_label(sample.get("cls")),
                                    _NoImage(key) if image is None else image)
        except StreamError as e:
            raise StreamError(f"{self.description}: {e}") from None


def shard_names(urls: Sequence[str]) -> list[str]:
    """Each shard as the spec names it, less the folder all of them share: the part of its
    image ids that tells shards apart. One folder's shards keep short ids (``wds:000.tar:KEY``);
    same-named shards of two folders stay apart (``wds:a/000.tar:KEY``, ``wds:b/000.tar:KEY``)."""
    cut = os.path.commonprefix(list(urls)).rfind("/") + 1
    return [u[cut:] or u for u in urls]


class _Counted:
    """A shard's byte stream that counts what it delivered (for "truncated at byte N") and
    keeps its last block (a whole tar ends in zero blocks)."""

    def __init__(self, raw: Any):
        self.raw, self.pos, self.head, self.tail = raw, 0, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if self.pos < len(COMPRESSED[-1]):
            self.head = (self.head + data)[:len(COMPRESSED[-1])]
        self.pos += len(data)
        self.tail = (self.tail + data)[-TAR_BLOCK:]
        return data

    def check_complete(self) -> None:
        """Read to the end and refuse a plain tar without its end-of-archive blocks: cut at or
        inside a member header, a shard looks to ``tarfile`` like a shorter whole one. (In a
        compressed shard the decompressor notices a cut.)"""
        while self.read(1 << 16):
            pass
        if self.head.startswith(COMPRESSED):
            return
        if self.pos % TAR_BLOCK or self.tail.count(0) != TAR_BLOCK:
            raise tarfile.ReadError(NO_END_MARKER)


PIPE_WAIT_S = 5.0  # how long a shard's command may take to exit once its output is closed
TAR_BLOCK = 512
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic (longest last)
NO_END_MARKER = "no end-of-archive blocks"
_TRUNCATED = ("unexpected end of data", "empty header", "truncated header", NO_END_MARKER)
CURL_EXITS = {6: "could not resolve the host", 7: "could not connect",
              22: "the server answered with an HTTP error", 28: "timed out",
              35: "the TLS handshake failed", 56: "the connection broke while receiving"}
_URL_HOST = re.compile(r"(https?)://([^/:\s'\"]+)(?::(\d+))?")


@contextlib.contextmanager
def _open_shard(url: str) -> Iterator[_Counted]:
    """The shard's bytes as webdataset's ``gopen`` opens them (files, URLs, ``pipe:``); any
    failure while they are read becomes a :class:`StreamError` naming the shard and its cause."""
    from webdataset.gopen import gopen

    stream = None
    try:
        stream = _Counted(gopen(url))
        yield stream
    except StreamError:
        raise
    except Exception as e:
        raise StreamError(f"shard {url}: {_cause(e, stream, url)}") from None
    finally:
        if stream is not None:
            _close(stream.raw)


def _close(raw: Any) -> None:
    """Close a shard read to its end or left early; a command still running after
    :data:`PIPE_WAIT_S` is killed instead of waited for."""
    proc = getattr(raw, "proc", None)
    try:
        if proc is None:
            raw.close()
            return
        raw.stream.close()
        try:
            proc.wait(timeout=PIPE_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except Exception:  # closing never hides the shard's own error, nor raises one of its own
        pass


def _cause(e: Exception, stream: _Counted | None, url: str) -> str:
    """What went wrong, in words: a command's exit status, a truncation point, an OS error."""
    raw = stream.raw if stream is not None else None
    proc = getattr(raw, "proc", None)
    if proc is not None:
        try:
            status = proc.wait(timeout=PIPE_WAIT_S)
        except subprocess.TimeoutExpired:
            status = None
        if status not in (None, 0, 141, -signal.SIGPIPE):  # 141: a shell's SIGPIPE
            return _exit_cause(raw, status, url)
    msg = (str(e.args[0]) if e.args else str(e)).split(" @ ")[0]  # webdataset adds " @ <obj>"
    n = stream.pos if stream is not None else 0
    if isinstance(e, tarfile.TarError):
        if n == 0:
            return "the command wrote no bytes" if proc is not None else "empty (0 bytes)"
        if msg in _TRUNCATED:
            return f"truncated at byte {n} ({msg})"
        return f"not a tar archive ({msg}; {n} bytes read)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _exit_cause(raw: Any, status: int, url: str) -> str:
    argv = raw.args[0][0] if getattr(raw, "args", None) and raw.args[0] else ""
    cmd = argv if isinstance(argv, str) else " ".join(map(str, argv))
    prog = cmd.split()[0] if cmd.split() else "the command"
    who = f"command `{cmd[:200]}`" if url.startswith("pipe:") else prog
    if status < 0:
        return f"{who} was killed by signal {-status}"
    why = ""
    if Path(prog).name == "curl" and status in CURL_EXITS:
        why = f" ({CURL_EXITS[status]}{_connect_error(url) if status == 7 else ''})"
    return f"{who} exited with status {status}{why}"


def _connect_error(text: str) -> str:
    """Why the first http(s) host in ``text`` refuses a connection, asked of the OS once."""
    m = _URL_HOST.search(text)
    if m is None:
        return ""
    host, port = m.group(2), int(m.group(3) or (443 if m.group(1) == "https" else 80))
    try:
        socket.create_connection((host, port), timeout=PIPE_WAIT_S).close()
    except OSError as e:
        return f" to {host}:{port}: {(e.strerror or str(e) or type(e).__name__).lower()}"
    return f" to {host}:{port}, which accepts connections now"


def _cls_label(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


_COUNT_CACHE: dict[str, int] = {}


def _cache_file() -> Path:
    root = os.environ.get("BRANCHLENS_CACHE") or Path.home() / ".cache" / "branchlens"
    return Path(root) / "wds-counts.json"


def count_shard(url: str) -> int:
    """Samples in one shard, grouped exactly as webdataset groups them (headers only: member
    data is skipped, not decoded). Local shards are cached by path, size and mtime."""
    key = url
    if _is_local(url):
        st = _local_path(url).stat()
        key = f"{_local_path(url).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    disk: dict[str, int] = {}
    if _is_local(url):
        try:
            disk = json.loads(_cache_file().read_text())
        except (OSError, ValueError):
            disk = {}
        if isinstance(disk.get(key), int):
            _COUNT_CACHE[key] = disk[key]
            return disk[key]
    n = _count_keys(url)
    _COUNT_CACHE[key] = n
    if _is_local(url):
        disk[key] = n
        try:
            from branchlens.artifacts import write_json

            write_json(_cache_file(), disk)
        except OSError:
            pass  # a read-only home only costs a recount
    return n


def _count_keys(url: str) -> int:
    from webdataset.tariterators import base_plus_ext, tar_file_expander

    state: dict[str, Any] = {"key": None, "n": 0}

    def select(fname: str) -> bool:  # sees every member name; reads no member data
        prefix, _ = base_plus_ext(fname)
        if prefix is not None and prefix != state["key"]:
            state["key"] = prefix
            state["n"] += 1
        return False

    with _open_shard(url) as stream:
        for _ in tar_file_expander([{"url": url, "stream": stream}], select_files=select):
            state["key"] = None  # end of shard: webdataset never groups across shards
        stream.check_complete()
    return state["n"]


# -- Hugging Face datasets ----------------------------------------------------------------------

def parse_hf_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``NAME[:SPLIT][?image=KEY&label=KEY]`` -> (name or local path, split, options)."""
    rest, _, query = spec.partition("?")
    opts = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
    bad = set(opts) - {"image", "label"}
    if bad:
        raise ValueError(f"hf:{spec}: unknown option(s) {sorted(bad)}; valid: image, label")
    name, split = rest, None
    if not Path(rest).expanduser().exists() and ":" in rest:
        head, _, tail = rest.rpartition(":")
        if tail and "/" not in tail:
            name, split = head, tail
    if not name:
        raise ValueError(f"hf:{spec}: no dataset name")
    return name, split, opts


def hf_spec(name: str, split: str | None, image_key: str, label_key: str) -> str:
    """The canonical spec (and description) of an HF source; reopens the same rows."""
    out = f"hf:{name}" + (f":{split}" if split else "")
    opts = [f"{k}={v}" for k, v, d in (("image", image_key, "image"), ("label", label_key,
                                                                        "label")) if v != d]
    return out + ("?" + "&".join(opts) if opts else "")


def open_hf(spec: str, variant: str | Variant = "bvlc_googlenet", limit: int | None = None,
            image_key: str | None = None, label_key: str | None = None) -> ImageSource:
    """A local ``save_to_disk`` / imagefolder / parquet folder or a hub name.

    A hub name with ``limit`` is streamed (only ``limit`` rows are downloaded); everything
    else is an Arrow dataset with random access. Errors of ``datasets`` become one line.
    """
    try:
        import datasets
    except ImportError:
        raise missing_extra("datasets", "hf") from None
    if os.environ.get("BRANCHLENS_QUIET") == "1":  # `branchlens -q`, torchrun ranks > 0
        datasets.disable_progress_bars()
    name, split, opts = parse_hf_spec(spec)
    image_key = image_key or opts.get("image", "image")
    label_key = label_key or opts.get("label", "label")
    explicit_label = "label" in opts or label_key != "label"
    path = Path(name).expanduser()
    desc = hf_spec(str(path.resolve()) if path.exists() else name, split, image_key, label_key)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.is_dir() and ((path / "state.json").is_file()
                                  or (path / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(path))
            elif path.exists():
                ds = datasets.load_dataset(str(path), split=split or "train")
            else:
                ds = datasets.load_dataset(name, split=split or "train",
                                           streaming=limit is not None)
    except Exception as e:  # network, missing files, bad builder: one line, never a trace
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"hf:{spec}: cannot load the dataset ({type(e).__name__}: "
                         f"{first[:300]})") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = _pick_split(ds, split, spec)
    features = ds.features or {}
    columns = list(features) if features else list(getattr(ds, "column_names", None) or [])
    if columns and image_key not in columns:
        raise ValueError(f"hf:{spec} has no column {image_key!r}; columns: "
                         f"{', '.join(columns)} (choose one with --image-key)")
    if columns and label_key not in columns:
        if explicit_label:
            raise ValueError(f"hf:{spec} has no column {label_key!r}; columns: "
                             f"{', '.join(columns)} (choose one with --label-key)")
        label_key = None
    if isinstance(features.get(image_key), datasets.Image):
        ds = ds.cast_column(image_key, datasets.Image(decode=False))  # we decode, robustly
    mapping = label_mapping(features.get(label_key) if label_key else None, spec)
    if isinstance(ds, datasets.IterableDataset):
        return HFStreamSource(ds, desc, limit, image_key, label_key, mapping)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return HFSource(ds, desc, image_key, label_key, mapping)


def _pick_split(dsd: Any, split: str | None, spec: str) -> Any:
    if not hasattr(dsd, "keys"):
        return dsd
    names = list(dsd.keys())
    if split is None and len(names) == 1:
        return dsd[names[0]]
    split = split or "train"
    if split not in names:
        raise ValueError(f"hf:{spec} has no split {split!r}; splits: {', '.join(names)}")
    return dsd[split]


@dataclass
class ClassNameMap:
    """ClassLabel names -> ILSVRC class indices; ``None`` where a name cannot be trusted."""

    classes: list[int | None]
    ambiguous: dict[str, list[int]]  # name -> the classes it could be
    unknown: list[str]

    @property
    def left_out(self) -> int:
        return sum(c is None for c in self.classes)

    def describe(self) -> str:
        parts = []
        if self.ambiguous:
            parts.append(f"{len(self.ambiguous)} ambiguous: " + ", ".join(
                f"{n} (class {' or '.join(map(str, c))})"
                for n, c in list(self.ambiguous.items())[:3]))
        if self.unknown:
            parts.append(f"{len(self.unknown)} not ImageNet names (e.g. "
                         f"{', '.join(self.unknown[:3])})")
        return "; ".join(parts)


_WNID_NAME = re.compile(r"(n\d{8})(?![0-9a-z])")
_Tiers = tuple[dict[str, frozenset[int]], ...]


@functools.lru_cache(maxsize=1)
def _imagenet_names() -> tuple[dict[str, int], _Tiers, _Tiers]:
    """(wnid -> class, exact-case tiers, case-folded tiers) over the full synonym lists. The
    tiers: a whole list as written (``tench, Tinca tinca``), first names, every synonym."""
    from branchlens.variants import label_synonyms

    syns = label_synonyms()

    def tiers(fold: bool) -> _Tiers:
        out: list[dict[str, set[int]]] = [{}, {}, {}]
        for i, names in enumerate(syns):
            names = [n.casefold() if fold else n for n in names]
            for tier, keys in zip(out, ([", ".join(names)], names[:1], names), strict=True):
                for key in keys:
                    tier.setdefault(key, set()).add(i)
        return tuple({k: frozenset(v) for k, v in t.items()} for t in out)

    return {w: i for i, w in enumerate(label_wnids())}, tiers(False), tiers(True)


def _lookup(key: str, tiers: _Tiers) -> frozenset[int] | None:
    """The classes of the first tier that knows ``key`` (a name that is one class's first
    name is that class, even when another class lists it further back: crayfish is 124, not
    spiny lobster 123). A single name never matches a whole list: maillot is 638 *or* 639."""
    for tier in tiers[:1] if ", " in key else tiers[1:]:
        if key in tier:
            return tier[key]
    return None


def map_class_names(names: Sequence[str]) -> ClassNameMap:
    """Each name by wnid first, else through the full ImageNet synonym lists; a name that could
    be several classes (crane: the bird 134 or the machine 517) or none stays unlabelled on
    its own, never relabelled, never taking the others with it. Case tells Cardigan (the corgi,
    264) from cardigan (the sweater, 474) only when the dataset writes every ImageNet name it
    has in ImageNet's case; otherwise names are compared case-folded."""
    wnids, exact, folded = _imagenet_names()
    keys = [" ".join(n.replace("_", " ").split()) for n in names]
    cased = all(_lookup(k, exact) is not None or _lookup(k.casefold(), folded) is None
                for k in keys)
    out = ClassNameMap([], {}, [])
    for name, key in zip(names, keys, strict=True):
        m = _WNID_NAME.match(key.lower())
        hit = (frozenset({wnids[m.group(1)]}) if m and m.group(1) in wnids
               else _lookup(key, exact) if cased else _lookup(key.casefold(), folded))
        out.classes.append(next(iter(hit)) if hit and len(hit) == 1 else None)
        if hit and len(hit) > 1:
            out.ambiguous[name] = sorted(hit)
        elif not hit:
            out.unknown.append(name)
    return out


def label_mapping(feature: Any, spec: str) -> dict[int, int | None] | None:
    """ClassLabel id -> ILSVRC class index (``None``: that class stays unlabelled) by
    :func:`map_class_names`; ``None`` keeps labels off. Plain integer labels are taken as
    ILSVRC ids (``{}`` means identity)."""
    import datasets

    if feature is None:
        return None
    if not isinstance(feature, datasets.ClassLabel):
        return {}
    found = map_class_names(feature.names)
    n = len(feature.names)
    if found.left_out == n:
        log.warning("hf:%s: none of its %d class names is an ImageNet class (%s); labels "
                    "left off", spec, n, found.describe())
        return None
    if found.left_out:
        log.warning("hf:%s: %d of %d classes left unlabelled: %s", spec, found.left_out, n,
                    found.describe())
    return dict(enumerate(found.classes))


def _row_record(row: dict, i: int, desc: str, image_key: str, label_key: str | None,
                mapping: dict[int, int | None] | None) -> RawRecord:
    payload = row.get(image_key)
    if isinstance(payload, dict):  # datasets.Image(decode=False): bytes, or a path
        payload = payload.get("bytes") or payload.get("path") or b""
    label = row.get(label_key) if label_key and mapping is not None else None
    if label is not None and mapping:
        label = mapping.get(int(label))
    return RawRecord(f"{desc}:{i}", None if label is None else int(label),
                     payload if payload is not None else b"")


class HFSource(ImageSource):
    """An Arrow-backed ``datasets.Dataset`` (local folder, ``save_to_disk`` or hub cache)."""

    def __init__(self, ds: Any, description: str, image_key: str, label_key: str | None,
                 mapping: dict[int, int | None] | None):
        self.ds, self.image_key, self.label_key, self.mapping = ds, image_key, label_key, mapping
        self.description = description

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> RawRecord:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return _row_record(self.ds[i], i, self.description, self.image_key, self.label_key,
                           self.mapping)


class HFStreamSource(StreamSource):
    """A streamed hub split capped at ``limit`` rows (only those are downloaded), in units of
    :data:`HF_UNIT_ROWS` rows so ranks and workers share it out."""

    def __init__(self, ds: Any, description: str, limit: int | None, image_key: str,
                 label_key: str | None, mapping: dict[int, int | None] | None):
        n = limit
        try:
            split = ds.info.splits.get(ds.split) if ds.info.splits else None
            if split is not None and split.num_examples:
                n = split.num_examples if n is None else min(n, split.num_examples)
        except (AttributeError, KeyError, TypeError):
            pass
        if n is None:
            raise ValueError(f"{description}: the number of rows is unknown; pass --limit")
        self.ds, self.n = ds.take(n), n
        self.image_key, self.label_key, self.mapping = image_key, label_key, mapping
        self.description = description

    @property
    def n_units(self) -> int:
        return -(-self.n // HF_UNIT_ROWS)

    def count_units(self) -> list[int]:
        return [min(HF_UNIT_ROWS, self.n - u * HF_UNIT_ROWS) for u in range(self.n_units)]

    def unit_records(self, u: int) -> Iterator[RawRecord]:
        start = u * HF_UNIT_ROWS
        part = self.ds.skip(start).take(self.unit_sizes[u]) if start else \
            self.ds.take(self.unit_sizes[u])
        pos = start
        try:
            # .iter(): plain iteration would shard the stream again inside a DataLoader worker
            for batch in part.iter(batch_size=64):
                for j in range(len(next(iter(batch.values()), []))):
                    yield _row_record({k: v[j] for k, v in batch.items()}, pos,
                                      self.description, self.image_key, self.label_key,
                                      self.mapping)
                    pos += 1
        except Exception as e:  # the hub, the network: one line naming the rows
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise StreamError(f"{self.description}: rows {start}-{start + self.unit_sizes[u] - 1}"
                              f" stopped at row {pos}: {type(e).__name__}"
                              f"{': ' + first if first else ''}") from None


class FlipStream(StreamSource):
    """Every record of a streamed source followed by its mirror (see ``FlipViews``)."""

    def __init__(self, source: StreamSource, limit: int | None = None):
        self.source, self.limit = source, limit
        self.description = f"{source.description}+flip"

    @property
    def n_units(self) -> int:
        return self.source.n_units

    def count_units(self) -> list[int]:
        sizes, total = [], 0
        for n in self.source.unit_sizes:
            n = 2 * n if self.limit is None else min(2 * n, self.limit - total)
            if n <= 0:
                break
            sizes.append(n)
            total += n
        return sizes

    def unit_records(self, u: int) -> Iterator[RawRecord]:
        size, pos = self.unit_sizes[u], 0
        for rec in self.source.unit_records(u):
            for view in (rec, flipped(rec)):
                if pos >= size:
                    return
                pos += 1
                yield view


class StreamedDecode(torch.utils.data.IterableDataset):
    """Decodes the wanted records of a streamed source; each DataLoader worker reads its own
    units. Wanted records that never arrive (a short or broken shard) come out as skips."""

    def __init__(self, source: StreamSource, indices: Sequence[int], variant: Variant,
                 paper_compat: bool, max_pixels: int):
        self.source, self.variant = source, variant
        self.paper_compat, self.max_pixels = paper_compat, max_pixels
        self.by_unit: dict[int, list[int]] = {}
        for i in sorted(set(indices)):
            self.by_unit.setdefault(source.unit_of(i), []).append(i)
        self.units = sorted(self.by_unit)
        self.offsets = source.offsets

    @property
    def n_units(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[tuple]:
        for u in unit_share(self.units):
            want = self.by_unit[u]
            wanted, seen, reason = set(want), set(), "missing"
            try:
                for pos, rec in enumerate(self.source.unit_records(u)):
                    g = self.offsets[u] + pos
                    if g > want[-1]:
                        break
                    if g in wanted:
                        seen.add(g)
                        yield decode_one(g, rec, self.variant, self.paper_compat,
                                          self.max_pixels)
            except Exception as e:  # a broken or unreachable shard: its rest is skipped
                reason = "unit_error"
                msg = str(e) if isinstance(e, StreamError) else (
                    f"{self.source.description}: unit {u}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                log.warning("%s; %d of its %d wanted images were read, the rest are skipped",
                            msg, len(seen), len(want))
            for g in want:
                if g not in seen:
                    yield g, f"{self.source.description}:{g}", None, None, reason


def with_columns(spec: str, image_key: str | None, label_key: str | None) -> str:
    """``spec`` with ``--image-key``/``--label-key`` folded in (they then travel with the
    source's description, so a later stage reopens the same columns)."""
    if not image_key and not label_key:
        return spec
    if not spec.startswith("hf:"):
        raise ValueError("--image-key/--label-key apply to hf: sources only")
    name, split, opts = parse_hf_spec(spec[3:])
    return hf_spec(name, split, image_key or opts.get("image", "image"),
                   label_key or opts.get("label", "label"))
