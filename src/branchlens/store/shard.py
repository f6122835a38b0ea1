"""The shard format: a safetensors file we write ourselves so every tensor carries a sha256
(checked lazily on first read) and can be memory-mapped with numpy; the file name carries the
file's own sha256, so the manifest needs no second pass over the data."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.artifacts import atomic_path
from branchlens.store.errors import CorruptShardError

FORMAT = "branchlens.activation_store"
FORMAT_VERSION = 1
SHARD_DIR = "shards"
SHARD_RE = re.compile(r"^r(\d+)-(\d+)-([0-9a-f]{64})\.safetensors$")
# Fixed log10 bins for vector norms, so per-shard histograms add up across shards and ranks.
NORM_LOG10_RANGE = (-4.0, 6.0)
NORM_BINS = 500
STORAGE_DTYPES = {"fp16": np.float16, "fp32": np.float32}

_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
              np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


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
        m = SHARD_RE.match(self.path.name)
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
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name))


# -- lock ---------------------------------------------------------------------------------------
