"""Writing a store: config first, whole images buffered into shards, resume from the shards
present, then ``finalize_store`` (images, streaming stats, manifest last)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.artifacts import provenance, read_json, write_json
from branchlens.store.errors import (
    StoreConfigMismatch,
    StoreError,
    StoreIncompleteError,
    write_error,
)
from branchlens.store.shard import (
    FORMAT,
    FORMAT_VERSION,
    NORM_BINS,
    NORM_LOG10_RANGE,
    SHARD_DIR,
    SHARD_RE,
    STORAGE_DTYPES,
    ShardFile,
    list_shards,
    write_shard,
)

CHECKED_FILES = ("images.json", "stats.json")  # sha256 in the manifest's "files"
# The files a harvest writes, in the order a discarded store loses them: the manifest first (the
# store stops being complete), config.json last (a kill midway still refuses other settings).
# The .lock stays: another writer may hold it.
STORE_FILES = ("manifest.json", "images.json", "stats.json", f"{SHARD_DIR}/*.safetensors",
               f"{SHARD_DIR}/.*.tmp", ".*.tmp", "config.json")
FINGERPRINT_KEY = "fingerprint"  # in config["source"]: what the source folder held (harvest)
DUPLICATE_EXAMPLES = 3  # sets of byte-identical images the manifest names


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
            if FINGERPRINT_KEY not in (old.get("source") or {}):  # an older branchlens's store
                (config.get("source") or {}).pop(FINGERPRINT_KEY, None)
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
        raise write_error(e, path) from e


def done_images(path: str | Path) -> set[int]:
    """Image indices already covered (stored or skipped) by complete shards."""
    done: set[int] = set()
    for p in list_shards(path):
        meta = ShardFile(p, verify=False).meta
        done.update(int(r[0]) for r in meta["images"])
        done.update(int(r[0]) for r in meta["skipped"])
    return done


def all_skipped(path: Path) -> bool:
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
            if (m := SHARD_RE.match(p.name)) and int(m.group(1)) == rank]
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
            raise write_error(e, self.path / SHARD_DIR) from e
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


def finalize_store(path: str | Path, n_images: int, extra: dict[str, Any],
                   content_of: Callable[[int], str | None] | None = None) -> dict[str, Any]:
    """Check that shards cover every image exactly once, merge stats, write the manifest last.

    ``content_of(index)``: the digest of a stored image's file, recorded in ``images.json`` as
    ``content``; images sharing one are listed under the manifest's ``duplicates`` (and share a
    side of the train/held-out split)."""
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
    duplicates = _record_contents(images, content_of) if content_of is not None else None
    stats = {layer: _final_stats(sums[layer]) for layer in layers}
    counts = {layer: sum(r["vectors"][layer] for r in shard_rows) for layer in layers}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
        **config,
        "counts": {"images": n_images, "images_stored": n_images - n_skipped,
                   "images_skipped": n_skipped, "vectors": counts},
        "skips": {"counts": skip_counts, "examples": skip_examples},
        **({} if duplicates is None else {"duplicates": duplicates}),
        "shards": shard_rows,
        **extra,
        "provenance": provenance(),
    }
    try:
        write_json(path / "images.json", images)
        write_json(path / "stats.json", stats)
        # checksummed like the shards: a hand edit of the std would move every scale rule
        manifest["files"] = {name: file_sha256(path / name) for name in CHECKED_FILES}
        write_json(path / "manifest.json", manifest)
    except OSError as e:
        raise write_error(e, path) from e
    return manifest


def _record_contents(images: list[dict], content_of: Callable[[int], str | None]
                     ) -> dict[str, Any]:
    """Put each stored image's content digest into its record; the sets of byte-identical
    images (2 or more ids with one digest) summarised: how many images, and a few examples."""
    by_content: dict[str, list[str]] = {}
    for i, rec in enumerate(images):
        if "skipped" in rec:
            continue
        digest = content_of(i)
        if digest is not None:
            rec["content"] = digest
            by_content.setdefault(digest, []).append(rec["id"])
    sets = [ids for ids in by_content.values() if len(ids) > 1]
    return {"sets": len(sets), "images": sum(len(ids) for ids in sets),
            "examples": [ids[:DUPLICATE_EXAMPLES] for ids in sets[:DUPLICATE_EXAMPLES]]}


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
