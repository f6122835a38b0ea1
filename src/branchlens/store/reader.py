"""Reading a finished store: memory-mapped per-layer arrays over all shards and the shuffled,
restartable batch stream that training consumes."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.artifacts import read_json
from branchlens.store.errors import CorruptShardError, StoreError, StoreIncompleteError
from branchlens.store.shard import (
    FORMAT,
    FORMAT_VERSION,
    SHARD_DIR,
    STORAGE_DTYPES,
    ShardFile,
    list_shards,
)
from branchlens.store.writer import CHECKED_FILES, all_skipped, file_sha256


def _all_finite(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values)


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


def split_groups(images: list[dict]) -> tuple[list[int], list[str]]:
    """Stored image indices of ``images.json`` and the split group of each: its view group,
    merged with the groups of byte-identical images (named by the first group name, so a store
    without duplicates splits exactly as by view group alone)."""
    from branchlens.data import view_group

    stored = [i for i, r in enumerate(images) if "skipped" not in r]
    own = {i: view_group(str(images[i].get("id", i))) for i in stored}
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    by_content: dict[str, list[str]] = {}
    for i in stored:
        content = images[i].get("content")
        if content:
            by_content.setdefault(content, []).append(own[i])
    for gs in by_content.values():
        roots = {root(g) for g in gs}
        first = min(roots)
        for r in roots:
            parent[r] = first
    return stored, [root(own[i]) for i in stored]


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
        self._warned_unchecked = False

    @classmethod
    def open(cls, path: str | Path, verify: bool | str = True) -> ActivationStore:
        """Open a finished store. ``verify``: True checks each tensor's sha256 on first read,
        ``"full"`` also checks every shard file now, False trusts the files."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            if (path / "config.json").is_file():
                if all_skipped(path):
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
            self._images = self._read_checked("images.json")
        return self._images

    def layer_stats(self, layer: str) -> dict[str, Any]:
        """Per-channel mean/std and norm summary; a non-finite or negative std is refused
        (it would silently move every scale-rule result)."""
        if self._stats is None:
            self._stats = self._read_checked("stats.json")
        stats = self._stats[self._layer(layer)]
        std, mean = stats.get("std", []), stats.get("mean", [])
        if not (_all_finite(std) and _all_finite(mean) and all(v >= 0 for v in std)):
            raise StoreError(f"{self.path / 'stats.json'}: {layer} mean/std hold non-finite or "
                             "negative values (hand-edited or corrupt); re-harvest the store")
        return stats

    def _read_checked(self, name: str) -> Any:
        """A JSON file of the store; when verifying, first its sha256 against the manifest."""
        path = self.path / name
        want = self.manifest.get("files", {}).get(name)
        if self.verify and want is not None and file_sha256(path) != want:
            raise CorruptShardError(f"{path}: sha256 differs from the manifest (hand-edited or "
                                    "corrupt); re-harvest the store")
        if self.verify and want is None and not self._warned_unchecked:
            self._warned_unchecked = True
            warnings.warn(f"store {self.path}: the manifest has no checksums of "
                          f"{' and '.join(CHECKED_FILES)} (an older branchlens wrote it); "
                          "they are read unverified", stacklevel=3)
        return read_json(path)

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
        of a training image never lands among the held-out images, nor does a byte-identical
        copy of it under another name (the ``content`` the harvest recorded).
        """
        if not 0 <= heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        stored, group = split_groups(self.images)
        groups = sorted(set(group))
        perm = np.random.default_rng(seed).permutation(len(groups))
        k = int(round(len(groups) * heldout_fraction))
        held_groups = {groups[j] for j in perm[:k]}
        held = np.array([i for i, g in zip(stored, group, strict=True) if g in held_groups],
                        np.int64)
        train = np.array([i for i, g in zip(stored, group, strict=True) if g not in held_groups],
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
