"""Out-of-core activation store: atomic shards, manifest, resume, lock and a shuffled reader.

One file per job: ``shard`` (the file format), ``lock`` (one writer), ``writer`` (shards,
resume, finalize), ``reader`` (``ActivationStore``, arrays, shuffled batches), ``errors``.

Layout of a store folder::

    config.json     what determines the content (variant, layers, sampling, source with the
                    fingerprint of its files, weights); written first, compared on every
                    resume so a store never mixes configs or the files of a changed folder
    shards/         r<rank>-<seq>-<sha256>.safetensors, each holding whole images for every
                    layer: vectors, provenance (image, y, x, sample) and streaming stat sums
    images.json     index -> {"id", "label", "shard", "content"} (or "skipped": reason);
                    "content": digest of the image file (duplicates share a split side)
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

from branchlens.store.errors import (
    CorruptShardError,
    SourceChanged,
    StoreConfigMismatch,
    StoreError,
    StoreIncompleteError,
    StoreLockedError,
)
from branchlens.store.lock import RunLock, StoreLock
from branchlens.store.reader import ActivationStore, ShardedArray
from branchlens.store.shard import (
    FORMAT,
    FORMAT_VERSION,
    NORM_BINS,
    NORM_LOG10_RANGE,
    SHARD_DIR,
    STORAGE_DTYPES,
    ShardFile,
    list_shards,
    write_shard,
)
from branchlens.store.writer import (
    STORE_FILES,
    ShardWriter,
    done_images,
    finalize_store,
    next_seq,
    prepare_store,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "NORM_BINS", "NORM_LOG10_RANGE", "SHARD_DIR", "STORAGE_DTYPES",
    "STORE_FILES", "ActivationStore", "CorruptShardError", "RunLock", "ShardFile", "ShardWriter",
    "ShardedArray", "SourceChanged", "StoreConfigMismatch", "StoreError", "StoreIncompleteError",
    "StoreLock", "StoreLockedError", "done_images", "finalize_store", "list_shards", "next_seq",
    "prepare_store", "write_shard",
]
