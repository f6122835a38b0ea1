"""Out-of-core activation store: atomic shards, manifest, resume, lock and a shuffled reader.

Layout of a store folder::

    config.json     what determines the content (variant, layers, sampling, source, weights);
                    written first, compared on every resume so a store never mixes configs
    shards/         r<rank>-<seq>-<sha256>.safetensors, each holding whole images for every
                    layer: vectors, provenance (image, y, x, sample) and streaming stat sums
    images.json     index -> {"id", "label", "shard"} (or "skipped": reason)   [on finalize]
    stats.json      per-layer mean/std per channel and norm distribution        [on finalize]
    manifest.json   everything above summarised + per-shard checksums; written last, so its
                    presence means the store is complete
    .lock           pid of the writer (flock-held: a killed writer leaves no live lock)

A shard is the unit of atomicity (temp file, fsync, rename): the set of images present in shards
is exactly the work done, so a killed harvest resumes without duplicates or gaps. Shards are
standard safetensors files that we write ourselves so that each tensor can be hashed (sha256 in
the header, checked lazily on first read) and memory-mapped with numpy. The file name carries the
file's own sha256, so the manifest needs no second pass over the data.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.artifacts import atomic_path, provenance, read_json, write_json

FORMAT = "branchlens.activation_store"
FORMAT_VERSION = 1
SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^r(\d+)-(\d+)-([0-9a-f]{64})\.safetensors$")
# Fixed log10 bins for vector norms, so per-shard histograms add up across shards and ranks.
NORM_LOG10_RANGE = (-4.0, 6.0)
NORM_BINS = 500
STORAGE_DTYPES = {"fp16": np.float16, "fp32": np.float32}

_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
              np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class StoreError(RuntimeError):
    """The store cannot be written or read as asked; the message says what to do."""


class StoreLockedError(StoreError):
    pass


class StoreConfigMismatch(StoreError):
    pass


class StoreIncompleteError(StoreError):
    pass


class CorruptShardError(StoreError):
    pass


# -- shard files --------------------------------------------------------------------------------

def _write_bytes(f, data) -> None:
    """Every byte of a shard goes through here (tests patch it to simulate a full disk)."""
    f.write(data)


def _raw(arr: np.ndarray) -> memoryview:
    """The bytes of an array as a flat view (also for zero-size arrays, unlike ``cast``)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(_raw(arr)).hexdigest()


def write_shard(folder: str | Path, stem: str, tensors: dict[str, np.ndarray],
                meta: dict[str, Any]) -> Path:
    """Write ``tensors`` as ``folder/<stem>-<sha256>.safetensors`` atomically; return the path.

    Tensors are laid out widest dtype first so every tensor is aligned for ``np.memmap``.
    """
    names = sorted(tensors, key=lambda k: -tensors[k].dtype.itemsize)
    arrays = [np.ascontiguousarray(tensors[k]) for k in names]
    header: dict[str, Any] = {}
    offset = 0
    for name, a in zip(names, arrays, strict=True):
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {
        "branchlens": json.dumps(meta),
        "sha256": json.dumps({k: _sha256(a) for k, a in zip(names, arrays, strict=True)}),
    }
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-(len(hb) + 8) % 8)
    head = len(hb).to_bytes(8, "little") + hb
    file_hash = hashlib.sha256(head)
    for a in arrays:
        file_hash.update(_raw(a))
    path = Path(folder) / f"{stem}-{file_hash.hexdigest()}.safetensors"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_bytes(f, head)
        for a in arrays:
            _write_bytes(f, _raw(a))
    return path


class ShardFile:
    """Read side of one shard: header, metadata, memory-mapped tensors with lazy verification."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._ok: set[str] = set()
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 1 << 30:
                    raise ValueError(f"bad header length {n}")
                header = json.loads(f.read(n))
            meta = header.pop("__metadata__", {})
            self.meta: dict[str, Any] = json.loads(meta.get("branchlens", "{}"))
            self.hashes: dict[str, str] = json.loads(meta.get("sha256", "{}"))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise CorruptShardError(f"shard {self.path} has an unreadable header: {e}") from e
        self.data_start = 8 + n
        self.tensors: dict[str, dict] = header
        m = _SHARD_RE.match(self.path.name)
        self.file_sha256 = m.group(3) if m else None

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memmap, checked against its sha256 on first access."""
        try:
            info = self.tensors[name]
            dtype, shape = _NP_DTYPES[info["dtype"]], tuple(info["shape"])
            start, end = info["data_offsets"]
            if end == start:
                return np.empty(shape, dtype)
            arr = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + start,
                            shape=shape)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise CorruptShardError(f"shard {self.path}: tensor {name!r} is unreadable "
                                    f"(truncated or corrupt?): {e!r}") from e
        if self.verify and name not in self._ok:
            if _sha256(arr) != self.hashes.get(name):
                raise CorruptShardError(
                    f"shard {self.path.name}: tensor {name!r} fails its sha256 check (the file "
                    "is corrupt). Delete the shard and its manifest.json, then re-run the same "
                    "harvest command to recompute the missing images.")
            self._ok.add(name)
        return arr

    def check_file(self) -> None:
        """Whole-file sha256 against the one in the file name (what the manifest lists)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != self.file_sha256:
            raise CorruptShardError(f"shard {self.path.name}: file sha256 mismatch (corrupt)")


def list_shards(path: str | Path) -> list[Path]:
    folder = Path(path) / SHARD_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD_RE.match(p.name))


# -- lock ---------------------------------------------------------------------------------------

class StoreLock:
    """Exclusive writer lock: ``flock`` on ``.lock``, which also holds pid and host for messages.

    ``flock`` is released by the kernel when the holder dies, so a lock file left by a killed
    (``kill -9``) writer is stale by construction and is simply taken over.
    """

    what = "store"  # named in the "locked" message

    def __init__(self, path: str | Path, what: str | None = None, name: str = ".lock"):
        self.file = Path(path) / name
        self.what = what or self.what
        self.fd: int | None = None
        self.replaced_stale: dict | None = None

    def acquire(self) -> StoreLock:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(e, self.file) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{self.what} {self.file.parent} is being written by another process "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to "
                f"finish or stop it. Two writers on one {self.what} are refused.") from None
        old = _read_lock(fd)
        if old.get("pid"):
            self.replaced_stale = old
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunLock(StoreLock):
    """The same kernel-released lock for a run folder or an SAE folder (one writer each)."""

    what = "run folder"


def _read_lock(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _write_error(e: OSError, where: Path) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the destination is not writable"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a path component is not a directory"
    else:
        why = os.strerror(e.errno or 0) or str(e)
    return StoreError(
        f"cannot write activation store at {where}: {why} ({e}). Completed shards are intact; "
        "fix the cause and re-run the same command to resume.")


# -- writer side --------------------------------------------------------------------------------

def prepare_store(path: str | Path, config: dict[str, Any]) -> None:
    """Create the store or check that an existing one has this exact ``config``.

    Also removes temp files a killed writer left behind. Call while holding the lock.
    """
    path = Path(path)
    config = json.loads(json.dumps(config))
    cfg_file = path / "config.json"
    try:
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if cfg_file.exists():
            old = read_json(cfg_file)
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                detail = "; ".join(f"{k}: store has {old.get(k)!r}, this run {config.get(k)!r}"
                                   for k in diff)
                raise StoreConfigMismatch(
                    f"store {path} was created with a different configuration ({detail}). "
                    "Use a new --out folder, or delete this store to start over.")
        else:
            if any(p.name not in (SHARD_DIR, ".lock") for p in path.iterdir()) or list_shards(path):
                raise StoreError(f"{path} is not empty and is not a branchlens activation store")
            write_json(cfg_file, config)
        for p in (path / SHARD_DIR).iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink()
    except OSError as e:
        raise _write_error(e, path) from e


def done_images(path: str | Path) -> set[int]:
    """Image indices already covered (stored or skipped) by complete shards."""
    done: set[int] = set()
    for p in list_shards(path):
        meta = ShardFile(p, verify=False).meta
        done.update(int(r[0]) for r in meta["images"])
        done.update(int(r[0]) for r in meta["skipped"])
    return done


def _all_skipped(path: Path) -> bool:
    """Whether a harvest covered every image of its source and kept none (so re-running the
    same harvest can never finish the store)."""
    n = read_json(path / "config.json").get("source", {}).get("n_images")
    stored = skipped = 0
    for p in list_shards(path):
        meta = ShardFile(p, verify=False).meta
        stored += len(meta["images"])
        skipped += len(meta["skipped"])
    return stored == 0 and skipped == n


def next_seq(path: str | Path, rank: int) -> int:
    seqs = [int(m.group(2)) for p in list_shards(path)
            if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) == rank]
    return max(seqs, default=-1) + 1


@dataclass
class _Pending:
    index: int
    image_id: str
    label: int | None
    vectors: dict[str, np.ndarray] | None  # None: skipped
    prov: dict[str, np.ndarray] | None
    reason: str | None = None


@dataclass
class ShardWriter:
    """Buffers whole images and writes a shard every ``shard_size`` images (or ``max_bytes``)."""

    path: Path
    rank: int
    layers: list[str]
    dims: dict[str, int]
    dtype: str = "fp16"
    shard_size: int = 1000
    max_bytes: int = 1 << 30
    seq: int = 0
    written_vectors: int = 0
    written_shards: int = 0
    _buf: list[_Pending] = field(default_factory=list)
    _bytes: int = 0

    def add(self, index: int, image_id: str, label: int | None,
            vectors: dict[str, np.ndarray], prov: dict[str, np.ndarray]) -> None:
        """One image: ``vectors[layer]`` [n, d] in the storage dtype, ``prov[layer]`` [n, 4]."""
        self._buf.append(_Pending(index, image_id, label, vectors, prov))
        self._bytes += sum(v.nbytes for v in vectors.values())
        self._maybe_flush()

    def skip(self, index: int, image_id: str, reason: str) -> None:
        self._buf.append(_Pending(index, image_id, None, None, None, reason))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._buf) >= self.shard_size or self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> Path | None:
        if not self._buf:
            return None
        np_dtype = STORAGE_DTYPES[self.dtype]
        stored = [p for p in self._buf if p.vectors is not None]
        tensors: dict[str, np.ndarray] = {}
        counts = {}
        for layer in self.layers:
            d = self.dims[layer]
            x = (np.concatenate([p.vectors[layer] for p in stored]) if stored
                 else np.empty((0, d), np_dtype))
            prov = (np.concatenate([p.prov[layer] for p in stored]).astype(np.int64)
                    if stored else np.empty((0, 4), np.int64))
            assert x.dtype == np_dtype and x.shape[1] == d, (x.dtype, x.shape, layer)
            tensors[layer] = x
            tensors[f"{layer}.prov"] = prov
            tensors.update({f"{layer}.{k}": v for k, v in _partial_stats(x).items()})
            counts[layer] = len(x)
        meta = {
            "format_version": FORMAT_VERSION, "rank": self.rank, "seq": self.seq,
            "dtype": self.dtype, "counts": counts,
            "images": [[p.index, p.image_id, p.label] for p in stored],
            "skipped": [[p.index, p.image_id, p.reason] for p in self._buf if p.vectors is None],
        }
        try:
            out = write_shard(self.path / SHARD_DIR, f"r{self.rank:03d}-{self.seq:06d}",
                              tensors, meta)
        except OSError as e:
            raise _write_error(e, self.path / SHARD_DIR) from e
        self.seq += 1
        self.written_shards += 1
        self.written_vectors += sum(counts.values())
        self._buf, self._bytes = [], 0
        return out


def _partial_stats(x: np.ndarray, chunk: int = 8192) -> dict[str, np.ndarray]:
    """Sums that add up across shards: per-channel sum/sumsq, norm moments and histogram.

    Float64 in chunks of rows, so the temporaries stay small whatever the shard size.
    """
    d = x.shape[1]
    s, ss = np.zeros(d), np.zeros(d)
    norms = np.empty(len(x))
    for a in range(0, len(x), chunk):
        x64 = x[a:a + chunk].astype(np.float64)
        sq = x64 * x64
        s += x64.sum(0)
        ss += sq.sum(0)
        norms[a:a + chunk] = np.sqrt(sq.sum(1))
    lo, hi = NORM_LOG10_RANGE
    hist = np.zeros(NORM_BINS + 2, np.int64)  # [underflow/zero, bins..., overflow]
    if len(x):
        with np.errstate(divide="ignore"):
            logn = np.log10(norms)
        hist[0] = int((logn < lo).sum())
        hist[-1] = int((logn >= hi).sum())
        hist[1:-1] = np.histogram(logn[(logn >= lo) & (logn < hi)], NORM_BINS, (lo, hi))[0]
    return {
        "sum": s, "sumsq": ss,
        "norm": np.array([len(x), norms.sum(), (norms ** 2).sum(),
                          norms.min() if len(x) else np.inf, norms.max() if len(x) else -np.inf]),
        "norm_hist": hist,
    }


def finalize_store(path: str | Path, n_images: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Check that shards cover every image exactly once, merge stats, write the manifest last."""
    path = Path(path)
    config = read_json(path / "config.json")
    layers = config["layers"]
    shards = [ShardFile(p) for p in list_shards(path)]
    owner: dict[int, int] = {}
    images: list[dict | None] = [None] * n_images
    skip_counts: dict[str, int] = {}
    skip_examples: dict[str, list[str]] = {}
    sums = {layer: {} for layer in layers}
    shard_rows = []
    for k, sh in enumerate(shards):
        for idx, image_id, label in sh.meta["images"]:
            _claim(owner, idx, k, n_images, sh)
            images[idx] = {"id": image_id, "label": label, "shard": k}
        for idx, image_id, reason in sh.meta["skipped"]:
            _claim(owner, idx, k, n_images, sh)
            images[idx] = {"id": image_id, "label": None, "skipped": reason}
            skip_counts[reason] = skip_counts.get(reason, 0) + 1
            ex = skip_examples.setdefault(reason, [])
            if len(ex) < 3:
                ex.append(image_id)
        for layer in layers:
            for key in ("sum", "sumsq", "norm", "norm_hist"):
                t = np.asarray(sh.get(f"{layer}.{key}"))
                if key == "norm":
                    prev = sums[layer].get(key)
                    t = t.copy() if prev is None else np.array([
                        prev[0] + t[0], prev[1] + t[1], prev[2] + t[2], min(prev[3], t[3]),
                        max(prev[4], t[4])])
                    sums[layer][key] = t
                else:
                    sums[layer][key] = sums[layer].get(key, 0) + t
        shard_rows.append({"file": sh.path.name, "sha256": sh.file_sha256,
                           "rank": sh.meta["rank"], "images": len(sh.meta["images"]),
                           "skipped": len(sh.meta["skipped"]), "vectors": sh.meta["counts"]})
    missing = [i for i, r in enumerate(images) if r is None]
    if missing:
        raise StoreIncompleteError(
            f"store {path}: {len(missing)} of {n_images} images are in no shard (first: "
            f"{missing[:5]}); re-run the same harvest command to fill them in")
    n_skipped = sum(skip_counts.values())
    if n_images == 0 or n_skipped == n_images:
        raise StoreError(
            f"store {path}: no usable image: {n_images} given, {n_skipped} skipped "
            f"({skip_counts or 'none'}; e.g. {skip_examples or '-'}); harvest other images "
            "into a new folder")
    stats = {layer: _final_stats(sums[layer]) for layer in layers}
    counts = {layer: sum(r["vectors"][layer] for r in shard_rows) for layer in layers}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
        **config,
        "counts": {"images": n_images, "images_stored": n_images - n_skipped,
                   "images_skipped": n_skipped, "vectors": counts},
        "skips": {"counts": skip_counts, "examples": skip_examples},
        "shards": shard_rows,
        **extra,
        "provenance": provenance(),
    }
    try:
        write_json(path / "images.json", images)
        write_json(path / "stats.json", stats)
        write_json(path / "manifest.json", manifest)
    except OSError as e:
        raise _write_error(e, path) from e
    return manifest


def _claim(owner: dict[int, int], idx: int, k: int, n: int, sh: ShardFile) -> None:
    if not 0 <= idx < n:
        raise StoreError(f"shard {sh.path.name} holds image {idx}, outside 0..{n - 1}")
    if idx in owner:
        raise StoreError(f"image {idx} is in two shards ({sh.path.name} and shard #{owner[idx]})"
                         ": two writers wrote this store; delete one of them")
    owner[idx] = k


def _final_stats(s: dict[str, np.ndarray]) -> dict[str, Any]:
    n, nsum, nsumsq, nmin, nmax = (float(v) for v in s["norm"])
    if n == 0:
        return {"count": 0}
    mean = s["sum"] / n
    var = np.maximum(s["sumsq"] / n - mean ** 2, 0.0)
    hist = np.asarray(s["norm_hist"], np.int64)
    lo, hi = NORM_LOG10_RANGE
    edges = np.linspace(lo, hi, NORM_BINS + 1)
    cdf = np.cumsum(hist[1:-1]) + hist[0]
    quant = {}
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        j = min(int(np.searchsorted(cdf, q * n)), NORM_BINS - 1)  # bin holding the quantile
        quant[str(q)] = float(10 ** ((edges[j] + edges[j + 1]) / 2))  # its log-midpoint
    return {
        "count": int(n), "mean": mean.tolist(), "std": np.sqrt(var).tolist(),
        "norm_mean": nsum / n, "norm_std": float(np.sqrt(max(nsumsq / n - (nsum / n) ** 2, 0))),
        "norm_rms": float(np.sqrt(nsumsq / n)), "norm_min": nmin, "norm_max": nmax,
        "norm_quantiles": quant,
        "norm_hist": {"log10_range": list(NORM_LOG10_RANGE), "bins": NORM_BINS,
                      "underflow": int(hist[0]), "overflow": int(hist[-1]),
                      "counts": hist[1:-1].tolist()},
    }


# -- reader -------------------------------------------------------------------------------------

class ShardedArray:
    """One layer's rows across shards, indexed like a single ``[N, d]`` array (read lazily).

    Supports ``len``, ``shape``, integer / slice / index-array row indexing (returns an ndarray)
    and ``np.asarray`` (reads everything). ``dtype`` casts what is returned (fp16 -> fp32 view).
    """

    def __init__(self, parts: list[Callable[[], np.ndarray]], counts: list[int], dim: int,
                 dtype: np.dtype):
        self._parts, self._dim, self.dtype = parts, dim, np.dtype(dtype)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self._offsets[-1]), dim)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((idx.size, self._dim), self.dtype)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._parts[s]()[idx[sel] - self._offsets[s]]
        return out

    def __getitem__(self, key):
        cols = slice(None)
        if isinstance(key, tuple):
            key, cols = key
        if isinstance(key, (int, np.integer)):
            return self._rows(np.array([key]))[0][cols]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))[:, cols]
            key = np.arange(start, stop, step)
        return self._rows(np.asarray(key))[:, cols]

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Contiguous rows: plain slices of each shard's memmap (no index arrays)."""
        out = np.empty((stop - start, self._dim), self.dtype)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        s = max(first, 0)
        while s < len(self._parts) and self._offsets[s] < stop:
            lo, hi = max(start, self._offsets[s]), min(stop, self._offsets[s + 1])
            if hi > lo:
                off = self._offsets[s]
                out[lo - start:hi - start] = self._parts[s]()[lo - off:hi - off]
            s += 1
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        for s in range(len(self._parts)):
            yield from np.asarray(self._parts[s](), self.dtype)


class ActivationStore:
    """Read-only view of a complete store (see the module docstring for the layout)."""

    def __init__(self, path: Path, manifest: dict, verify: bool):
        self.path = path
        self.manifest = manifest
        self.layers: list[str] = list(manifest["layers"])
        self.verify = verify
        self.shards = [ShardFile(path / SHARD_DIR / r["file"], verify=verify)
                       for r in manifest["shards"]]
        self._images: list[dict] | None = None
        self._stats: dict | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool | str = True) -> ActivationStore:
        """Open a finished store. ``verify``: True checks each tensor's sha256 on first read,
        ``"full"`` also checks every shard file now, False trusts the files."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            if (path / "config.json").is_file():
                if _all_skipped(path):
                    raise StoreError(f"store {path} holds no usable image: every image of its "
                                     "source was skipped; harvest other images")
                raise StoreIncompleteError(
                    f"store {path} is incomplete (a harvest is running or was interrupted); "
                    "re-run the same harvest command to finish it")
            raise StoreError(f"{path} is not an activation store (no manifest.json)")
        manifest = read_json(mf)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{mf}: unsupported store format {manifest.get('format')!r} "
                             f"v{manifest.get('format_version')}")
        on_disk = {p.name for p in list_shards(path)}
        listed = [r["file"] for r in manifest["shards"]]
        gone = [f for f in listed if f not in on_disk]
        if gone:
            raise CorruptShardError(f"store {path}: shard(s) listed in the manifest are missing: "
                                    f"{gone[:3]}")
        store = cls(path, manifest, verify=bool(verify))
        if verify == "full":
            store.check_files()
        return store

    # -- metadata ----------------------------------------------------------------------------
    def dim(self, layer: str) -> int:
        return int(self.manifest["widths"][self._layer(layer)]["channels"])

    def count(self, layer: str) -> int:
        return int(self.manifest["counts"]["vectors"][self._layer(layer)])

    @property
    def images(self) -> list[dict]:
        if self._images is None:
            self._images = read_json(self.path / "images.json")
        return self._images

    def layer_stats(self, layer: str) -> dict[str, Any]:
        if self._stats is None:
            self._stats = read_json(self.path / "stats.json")
        return self._stats[self._layer(layer)]

    def content_hash(self) -> str:
        """sha256 over the config and the shard checksums: identifies the stored data."""
        keys = ("variant", "layers", "widths", "sampling", "dtype", "source", "weights")
        body = {k: self.manifest.get(k) for k in keys}
        body["shards"] = sorted(r["sha256"] for r in self.manifest["shards"])
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def split_images(self, heldout_fraction: float, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Stored image indices split at random into (train, held-out), each sorted.

        The split is by underlying image (:func:`branchlens.data.view_group`): a mirror or crop
        of a training image never lands among the held-out images.
        """
        from branchlens.data import view_group

        if not 0 <= heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        stored = [i for i, r in enumerate(self.images) if "skipped" not in r]
        groups = sorted({view_group(str(self.images[i].get("id", i))) for i in stored})
        perm = np.random.default_rng(seed).permutation(len(groups))
        k = int(round(len(groups) * heldout_fraction))
        held_groups = {groups[j] for j in perm[:k]}
        held = np.array([i for i in stored
                         if view_group(str(self.images[i].get("id", i))) in held_groups], np.int64)
        train = np.array([i for i in stored
                          if view_group(str(self.images[i].get("id", i))) not in held_groups],
                         np.int64)
        return train, held

    def check_files(self) -> None:
        """Read every shard once and compare its sha256 with the manifest."""
        for sh, row in zip(self.shards, self.manifest["shards"], strict=True):
            if sh.file_sha256 != row["sha256"]:
                raise CorruptShardError(f"{sh.path.name}: not the shard the manifest lists")
            sh.check_file()

    # -- data --------------------------------------------------------------------------------
    def _layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} is not in this store; it has {self.layers}")
        return layer

    def array(self, layer: str, dtype: Any = None) -> ShardedArray:
        """All vectors of a layer as a lazily read ``[N, d]`` array (stored dtype by default)."""
        layer = self._layer(layer)
        counts = [sh.meta["counts"][layer] for sh in self.shards]
        dt = STORAGE_DTYPES[self.manifest["dtype"]] if dtype is None else dtype
        parts = [lambda sh=sh: sh.get(layer) for sh in self.shards]
        return ShardedArray(parts, counts, self.dim(layer), dt)

    def provenance(self, layer: str) -> np.ndarray:
        """``[N, 4]`` int64 rows (image_index, y, x, sample_index), aligned with ``array``."""
        layer = self._layer(layer)
        parts = [np.asarray(sh.get(f"{layer}.prov")) for sh in self.shards]
        return np.concatenate(parts) if parts else np.empty((0, 4), np.int64)

    def image(self, index: int, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, d], provenance [n, 4]) stored for one image at one layer."""
        layer = self._layer(layer)
        rec = self.images[index]
        if "skipped" in rec:
            return np.empty((0, self.dim(layer)), np.float32), np.empty((0, 4), np.int64)
        sh = self.shards[rec["shard"]]
        prov = np.asarray(sh.get(f"{layer}.prov"))
        rows = np.flatnonzero(prov[:, 0] == index)
        return np.asarray(sh.get(layer)[rows]), prov[rows]

    def iter_batches(self, layer: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     images: Sequence[int] | np.ndarray | None = None, epochs: int = 1,
                     dtype: Any = None, buffer_size: int | None = None,
                     drop_last: bool = False) -> Iterator[Any]:
        """Batches ``[B, d]`` torch tensors (float32 default) with bounded memory.

        Shuffling: shards in a random order, rows of each shard in a random order, mixed in a
        buffer of ``buffer_size`` vectors (default ``max(4 * batch_size, 65536)``); memory is
        about 1.5 buffers, independent of the store size. ``images`` keeps only those image
        indices (held-out evaluation is on whole images). Each epoch has its own order.
        """
        import torch

        layer = self._layer(layer)
        dtype = torch.float32 if dtype is None else dtype
        keep = None if images is None else np.unique(np.asarray(images, np.int64))
        cap = max(buffer_size or max(4 * batch_size, 65536), batch_size)
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, epoch])
            if shuffle:
                blocks = self._row_blocks(layer, keep, rng, max(cap // 4, 1))
                batches = _shuffle_buffer(blocks, batch_size, cap, self.dim(layer), rng,
                                          drop_last)
            else:
                batches = _rebatch(self._row_blocks(layer, keep, None, batch_size), batch_size,
                                   drop_last)
            for b in batches:
                yield torch.from_numpy(b).to(dtype)

    def _row_blocks(self, layer: str, keep: np.ndarray | None, rng: np.random.Generator | None,
                    chunk: int) -> Iterator[np.ndarray]:
        """Rows of a layer in blocks of <= ``chunk``: shards and rows in random order if rng."""
        order = rng.permutation(len(self.shards)) if rng is not None else range(len(self.shards))
        for s in order:
            sh = self.shards[s]
            n = sh.meta["counts"][layer]
            if n == 0:
                continue
            rows = np.arange(n)
            if keep is not None:
                rows = rows[np.isin(np.asarray(sh.get(f"{layer}.prov"))[:, 0], keep)]
            if rng is not None:
                rows = rng.permutation(rows)
            data = sh.get(layer)
            for start in range(0, len(rows), chunk):
                idx = rows[start:start + chunk]
                yield data[np.sort(idx)] if rng is not None else data[idx]


def _rebatch(blocks: Iterator[np.ndarray], batch_size: int, drop_last: bool
             ) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    n = 0
    for block in blocks:
        pending.append(block)
        n += len(block)
        if n >= batch_size:
            buf = np.concatenate(pending)
            n_out = n // batch_size * batch_size
            for b in range(0, n_out, batch_size):
                yield buf[b:b + batch_size]
            pending, n = [buf[n_out:].copy()], n - n_out
    if n and not drop_last:
        yield np.concatenate(pending)


def _shuffle_buffer(blocks: Iterator[np.ndarray], batch_size: int, cap: int, dim: int,
                    rng: np.random.Generator, drop_last: bool) -> Iterator[np.ndarray]:
    """A preallocated buffer: fill it, emit half of it as random batches, compact, repeat."""
    buf: np.ndarray | None = None
    n = 0

    def drain(n: int, n_out: int) -> Iterator[np.ndarray]:
        perm = rng.permutation(n)
        for b in range(0, n_out, batch_size):
            yield buf[perm[b:b + batch_size]]
        rest = np.sort(perm[n_out:])
        buf[:len(rest)] = buf[rest]

    for block in blocks:
        if buf is None:
            buf = np.empty((cap, dim), block.dtype)
        while len(block):
            k = min(cap - n, len(block))
            buf[n:n + k], block, n = block[:k], block[k:], n + k
            if n == cap:
                n_out = max(cap // 2 // batch_size, 1) * batch_size
                yield from drain(n, n_out)
                n -= n_out
    if n:
        n_out = n if not drop_last else n // batch_size * batch_size
        yield from drain(n, n_out)
