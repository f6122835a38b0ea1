"""What the loop trains on: the global batches of epoch ``e`` as a pure function of
``(seed, e)``, addressable by batch index, so a resumed run sees exactly the batches an
uninterrupted one would (arrays, activation stores, or any callable)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor

from branchlens.sae import DEFAULT_DEAD_AFTER


# ---------------------------------------------------------------------------------------------
# Data: anything that yields the global batches of epoch e, restartable at a batch index.
# ---------------------------------------------------------------------------------------------
class Batches:
    """Global batches of an epoch, addressable as ``epoch(e, start)`` (deterministic)."""

    n_vectors: int | None = None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:  # pragma: no cover
        raise NotImplementedError


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class ArrayBatches(Batches):
    """Block-shuffled batches from an array or a memory-mapped ``.npy`` with bounded memory.

    The epoch order permutes chunks of ``chunk`` consecutive rows, then shuffles rows within
    windows of ``buffer_chunks`` chunks (the shuffle buffer). Memory-mapped arrays are read with
    plain file reads, so resident memory stays at one window however large the file is.
    """

    def __init__(self, array: np.ndarray | Tensor, batch_size: int, seed: int = 0,
                 rows: np.ndarray | None = None, chunk: int = 2048, buffer_chunks: int = 64,
                 drop_last: bool = True):
        self.array = array.numpy() if isinstance(array, Tensor) else array
        self.rows = (np.arange(len(self.array)) if rows is None
                     else np.sort(np.asarray(rows, dtype=np.int64)))
        self.batch_size, self.seed = batch_size, seed
        self.chunk, self.buffer_chunks, self.drop_last = chunk, buffer_chunks, drop_last
        self.n_vectors = len(self.rows)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
        n, c = len(self.rows), self.chunk
        order = rng.permutation(math.ceil(n / c))
        out = []
        for w in range(0, len(order), self.buffer_chunks):
            pos = np.concatenate([np.arange(i * c, min((i + 1) * c, n))
                                  for i in order[w:w + self.buffer_chunks]])
            out.append(pos[rng.permutation(len(pos))])
        return out

    def _read(self, pos: np.ndarray) -> np.ndarray:
        """Rows ``self.rows[pos]`` (any order), read chunk by chunk as contiguous spans."""
        out = np.empty((len(pos), self.array.shape[1]), dtype=np.float32)
        chunk_of = pos // self.chunk
        for ci in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == ci)[0]
            rows = self.rows[pos[sel]]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            out[sel] = _read_span(self.array, lo, hi)[rows - lo]
        return out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        B = self.batch_size
        skip = start * B
        carry = np.empty((0, self.array.shape[1]), dtype=np.float32)
        for pos in self._windows(epoch):
            if skip >= len(pos):
                skip -= len(pos)
                continue
            data = np.concatenate([carry, self._read(pos[skip:])])
            skip = 0
            nfull = len(data) // B
            for i in range(nfull):
                yield torch.from_numpy(data[i * B:(i + 1) * B])
            carry = data[nfull * B:]
        if len(carry) and not self.drop_last:
            yield torch.from_numpy(carry)


def _read_span(arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    import mmap

    if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.flags.c_contiguous:
        row = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        flat = np.fromfile(arr.filename, dtype=arr.dtype, count=(hi - lo) * row // arr.itemsize,
                           offset=arr.offset + lo * row)
        return flat.reshape((hi - lo, *arr.shape[1:])).astype(np.float32, copy=False)
    return np.asarray(arr[lo:hi], dtype=np.float32)


class StoreBatches(Batches):
    """Batches of one layer of an :class:`ActivationStore`, restricted to some images."""

    def __init__(self, store: Any, layer: str, batch_size: int, seed: int = 0,
                 images: Iterable[int] | None = None, shuffle: bool = True,
                 drop_last: bool = True):
        self.store, self.layer, self.batch_size, self.seed = store, layer, batch_size, seed
        self.images = None if images is None else np.asarray(sorted(images), dtype=np.int64)
        self.shuffle, self.drop_last = shuffle, drop_last
        prov_images = np.asarray(store.provenance(layer)[:, 0])
        self.n_vectors = int(len(prov_images) if self.images is None
                             else np.isin(prov_images, self.images).sum())

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        images = None if self.images is None else self.images.tolist()
        it = self.store.iter_batches(self.layer, self.batch_size, shuffle=self.shuffle,
                                     seed=_epoch_seed(self.seed, epoch), images=images, epochs=1,
                                     drop_last=self.drop_last)
        return islice(it, start, None)  # fast-forward by reading (the store cannot seek)


class CallableBatches(Batches):
    """Wraps ``fn(epoch) -> iterable of [B, d] tensors`` (must be deterministic per epoch)."""

    def __init__(self, fn: Callable[[int], Iterable[Tensor]], n_vectors: int | None = None):
        self.fn, self.n_vectors = fn, n_vectors

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        return islice(iter(self.fn(epoch)), start, None)


def as_batches(data: Any, batch_size: int, seed: int = 0) -> Batches:
    if isinstance(data, Batches):
        return data
    if isinstance(data, (np.ndarray, Tensor)):
        return ArrayBatches(data, batch_size, seed)
    if callable(data):
        return CallableBatches(data)
    raise TypeError(f"cannot make batches from {type(data).__name__}")


def default_dead_after(n_vectors: int | None) -> int:
    """Gao et al. use 10 M tokens; on small data half an epoch without firing means dead."""
    if n_vectors is None:
        return DEFAULT_DEAD_AFTER
    return int(min(DEFAULT_DEAD_AFTER, max(n_vectors // 2, 1)))



def init_sample(batches: Batches, n: int) -> Tensor:
    """The first ``n`` vectors of epoch 0: the sample the SAE fixes its scale and ``b_pre`` from."""
    out, got = [], 0
    for x in batches.epoch(0):
        out.append(x.float())
        got += x.shape[0]
        if got >= n:
            break
    if not out:
        raise ValueError("no training data (fewer vectors than one batch?)")
    return torch.cat(out)[:n]


def heldout_images(sae, store) -> tuple[np.ndarray, str]:
    """The SAE's own held-out image indices, and a note on which images the data side uses."""
    meta = getattr(sae, "meta", {}) or {}
    cfg = (meta.get("train") or {}).get("config") or {}
    frac = float(cfg.get("heldout_fraction", 0.0) or 0.0)
    seed = int(cfg.get("seed", meta.get("seed", 0)) or 0)
    why = "it was trained without a held-out split"
    if frac > 0:
        train, held = store.split_images(frac, seed)
        if held.size:
            return held, f"held-out images of the SAE ({held.size}; fraction {frac}, seed {seed})"
        from branchlens.data import view_group

        n = len({view_group(str(store.images[i].get("id", i))) for i in train})
        why = f"held-out fraction {frac} of {n} images rounds to 0 held-out images"
    stored = np.array([i for i, r in enumerate(store.images) if "skipped" not in r], np.int64)
    return stored, (f"{why}; data-side numbers use ALL stored images, including the SAE's "
                    "training images")
