"""Collect activations of many layers in one forward pass into an :mod:`~branchlens.store`.

Per batch the model runs once and stops at the deepest requested layer. Per image and layer we
keep a few spatial positions (``norm``: N draws with replacement, probability proportional to the
L2 norm of the channel vector, as in the paper; ``uniform``: N distinct positions; ``all``). The
random stream of an image depends only on (seed, image index, layer or grid), never on batch
composition or rank, so a resumed or multi-rank harvest stores exactly what one uninterrupted
process would. With ``aligned`` the layers of one grid size share their positions (drawn from the
norm of the concatenated vector), so features can later be matched across layers.

This is the library: :func:`collect` takes a network, an opened image source and a store path.
The harvest stage (:mod:`branchlens.stages.harvest`) opens the source, loads the weights and
joins the ranks. Scale-out: under ``torchrun`` images are split across ranks, every rank writes
its own shards, and rank 0 holds the store lock and writes the manifest at the end.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from branchlens.artifacts import read_json
from branchlens.data import SkipStats, iter_batches, split_for_rank
from branchlens.distributed import Dist
from branchlens.harvest.fingerprint import (
    describe_change,
    local_files,
    record_digest,
    source_fingerprint,
)
from branchlens.harvest.sampling import (
    SAMPLING_METHODS,
    cap_samples,
    sample_batch,
    sampling_groups,
)
from branchlens.model import InceptionV1, layer_names
from branchlens.progress import progress
from branchlens.settings import HarvestConfig
from branchlens.store import (
    STORAGE_DTYPES,
    ShardWriter,
    SourceChanged,
    StoreError,
    StoreLock,
    done_images,
    finalize_store,
    next_seq,
    prepare_store,
)
from branchlens.variants import DEFAULT_VARIANT, Variant, branch_slices, get_variant

log = logging.getLogger("branchlens.harvest")


DEFAULT_LAYERS = tuple(b.name for b in get_variant(DEFAULT_VARIANT).blocks
                       if b.name.startswith("mixed4"))


def parse_layers(layers: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    names = [s for s in names if s]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need a non-empty list of distinct layers, got {layers!r}")
    return names


def check_settings(variant: str | Variant, layers: Sequence[str], *, sampling: str,
                   samples_per_image: int, dtype: str, batch_size: int, shard_size: int,
                   workers: int, limit: int | None) -> None:
    """Refuse settings a harvest cannot run with (ValueError), before any image or weight is
    read (the variant and layers last); the messages name the CLI options."""
    if sampling not in SAMPLING_METHODS:
        raise ValueError(f"--sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if sampling != "all" and samples_per_image < 1:
        raise ValueError("--samples-per-image must be >= 1")
    for name, value, least in (("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                               ("--workers", workers, 0), ("--limit", limit, 1)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    unknown = [n for n in layers if n not in layer_names(variant)]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; see branchlens.model.layer_names()")


def image_count(src: Any, limit: int | None) -> int:
    """How many images of ``src`` a harvest with ``limit`` stores (stored or skipped)."""
    return len(src) if limit is None else min(limit, len(src))


def layer_shapes(model: InceptionV1, layers: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each named output at the variant's input size, from one forward of zeros.

    (A meta-device forward would avoid the compute but lazily imports seconds of torch code.)
    """
    crop = model.variant.preprocessing.crop
    p = next(model.parameters())
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, crop, crop, device=p.device, dtype=p.dtype), list(layers))
    return {k: tuple(out[k].shape[1:]) for k in layers}  # type: ignore[misc]


def _branches(variant: str, layer: str) -> dict[str, list[int]] | None:
    try:
        return {b: [s.start, s.stop] for b, s in branch_slices(variant, layer).items()}
    except KeyError:
        return None  # not a block or branch output (stem, bottleneck, pre-ReLU...)


@dataclass
class HarvestResult:
    path: Path
    manifest: dict | None  # rank 0 only
    rank: int = 0
    world_size: int = 1
    resumed_images: int = 0  # already in the store when this run started
    images: int = 0  # processed by this rank in this run (stored + skipped)
    vectors: int = 0  # written by this rank in this run, all layers
    skips: SkipStats = field(default_factory=SkipStats)
    contents: dict[int, str] = field(default_factory=dict)  # image -> digest of its file


class _OrderedSkips(SkipStats):
    """SkipStats that also remembers the order of skips, to pair them with image indices."""

    def __init__(self) -> None:
        super().__init__()
        self.events: deque[tuple[str, str]] = deque()

    def add(self, reason: str, image_id: str) -> None:
        super().add(reason, image_id)
        self.events.append((reason, image_id))

    def add_unqueued(self, reason: str, image_id: str) -> None:
        """Count a skip found after decoding (e.g. non-finite activations)."""
        super().add(reason, image_id)


def collect(
    model: InceptionV1,
    src: Any,
    out: str | Path,
    layers: Sequence[str],
    *,
    weights: dict[str, Any],
    device: torch.device,
    comm: Dist,
    sampling: str = HarvestConfig.sampling,  # the harvest block's defaults (settings.py)
    samples_per_image: int = HarvestConfig.samples_per_image,
    aligned: bool = HarvestConfig.aligned,
    dtype: str = HarvestConfig.dtype,
    batch_size: int = HarvestConfig.batch_size,
    workers: int = 1,
    seed: int = 0,
    shard_size: int = HarvestConfig.shard_size,
    paper_compat: bool = False,
    limit: int | None = HarvestConfig.limit,
    show_progress: bool = True,
    channels_last: bool = True,
) -> HarvestResult:
    """Harvest ``layers`` of ``model`` (already on ``device``, in eval mode) over every image of
    the opened source ``src`` into the store at ``out`` (resumable; this rank's share under
    ``comm``). ``weights`` is the network's record (``WeightsInfo.to_dict()``); it goes into the
    store's config, so a store never mixes networks.

    Raises :class:`~branchlens.store.StoreError` subclasses with actionable messages.
    """
    layers = list(layers)
    check_settings(model.variant, layers, sampling=sampling, samples_per_image=samples_per_image,
                   dtype=dtype, batch_size=batch_size, shard_size=shard_size, workers=workers,
                   limit=limit)
    v = model.variant
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shapes = layer_shapes(model, layers)
    if sampling == "uniform":
        small = [k for k in layers if shapes[k][1] * shapes[k][2] < samples_per_image]
        if small:
            raise ValueError(f"uniform sampling of {samples_per_image} positions: grid too "
                             f"small for {small}")
    if sampling == "norm":
        samples_per_image = cap_samples(samples_per_image, layers, shapes)
    n = image_count(src, limit)
    fingerprint = source_fingerprint(src) if comm.rank == 0 else None
    config = _store_config(v.name, layers, shapes, src.description, n, limit, sampling,
                           samples_per_image, aligned, seed, dtype, paper_compat, weights,
                           fingerprint)
    lock: StoreLock | None = None
    try:
        setup: tuple[str, str] | list[int] | None = None
        if comm.rank == 0:
            try:
                lock, setup = _open_for_writing(out, config, n)
            except StoreError as e:
                if comm.world == 1:
                    raise
                setup = (type(e).__name__, str(e))
        setup = comm.bcast(setup)
        if isinstance(setup, tuple):
            raise StoreError(f"rank 0 could not open the store: {setup[0]}: {setup[1]}")
        remaining = setup
        mine = split_for_rank(src, remaining, comm.world, comm.rank)
        writer = ShardWriter(Path(out), comm.rank, layers, {k: shapes[k][0] for k in layers},
                             dtype, shard_size, seq=next_seq(out, comm.rank))
        result = HarvestResult(Path(out), None, comm.rank, comm.world, n - len(remaining))
        failure: BaseException | None = None
        try:
            _loop(model, src, mine, writer, result, layers=layers, shapes=shapes,
                  sampling=sampling, n_samples=samples_per_image, aligned=aligned, seed=seed,
                  dtype=dtype, batch_size=batch_size, workers=workers,
                  paper_compat=paper_compat, device=device, channels_last=channels_last,
                  show=show_progress and comm.rank == 0)
            writer.flush()
        except Exception as e:
            failure = e
        errors = comm.gather(None if failure is None else f"rank {comm.rank}: {failure}")
        if failure is not None:
            raise failure
        if any(errors):
            raise StoreError("harvest failed on another rank: " + "; ".join(filter(None, errors)))
        contents = {i: d for part in comm.gather(result.contents) for i, d in part.items()}
        final: tuple[str, str] | None = None
        if comm.rank == 0:
            try:
                extra = {"weights": weights,
                         "harvest": {"world_size": comm.world, "batch_size": batch_size,
                                     "shard_size": shard_size, "device": str(device)}}
                content_of = (None if local_files(src) is None else
                              lambda i: contents[i] if i in contents else record_digest(src, i))
                result.manifest = finalize_store(out, n, extra, content_of)
                _warn_duplicates(result.manifest)
            except StoreError as e:
                final = (type(e).__name__, str(e))
                if comm.world == 1:
                    raise
        final = comm.bcast(final)
        if final is not None:
            raise StoreError(f"rank 0 could not finalize the store: {final[0]}: {final[1]}")
        return result
    finally:
        if lock is not None:
            lock.release()


def _warn_duplicates(manifest: dict[str, Any]) -> None:
    dup = manifest.get("duplicates") or {}
    if dup.get("sets"):
        eg = "; ".join(" = ".join(ids) for ids in dup["examples"])
        log.warning("harvest: %d images are byte-identical copies of another under other names "
                    "(%d sets, e.g. %s); each set is kept on one side of the train/held-out "
                    "split", dup["images"], dup["sets"], eg)


def _store_config(variant: str, layers: list[str], shapes: dict, source: str, n: int,
                  limit: int | None, sampling: str, samples_per_image: int, aligned: bool,
                  seed: int, dtype: str, paper_compat: bool, weights: dict,
                  fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that determines the stored data; a resumed run must match it exactly (the
    source's ``fingerprint`` too: other files under the same name are other data)."""
    return {
        "variant": variant,
        "layers": layers,
        "widths": {k: {"channels": shapes[k][0], "grid": list(shapes[k][1:]),
                       "branches": _branches(variant, k)} for k in layers},
        "sampling": {"method": sampling,
                     "samples_per_image": None if sampling == "all" else samples_per_image,
                     "aligned": aligned, "seed": seed,
                     "groups": [g for _, g in sampling_groups(layers, shapes, aligned)]},
        "dtype": dtype,
        "source": {"description": source, "n_images": n, "limit": limit,
                   "paper_compat": paper_compat,
                   "input_size": get_variant(variant).preprocessing.crop,
                   "fingerprint": fingerprint},
        "weights": {k: weights.get(k) for k in ("variant", "source", "sha256", "seed")},
    }


def _open_for_writing(out: str | Path, config: dict, n: int) -> tuple[StoreLock, list[int]]:
    """Rank 0: lock, create or check the store; return the image indices still to do."""
    lock = StoreLock(out).acquire()
    try:
        if lock.replaced_stale:
            log.info("took over the stale lock of a dead writer %s", lock.replaced_stale)
        _check_source(Path(out), config["source"])
        prepare_store(out, config)
        done = done_images(out)
        todo = [i for i in range(n) if i not in done]
        manifest = Path(out) / "manifest.json"
        if todo and manifest.exists():
            manifest.unlink()  # the store grows again: not complete until finalized
        return lock, todo
    except BaseException:
        lock.release()
        raise


def _check_source(out: Path, source: dict[str, Any]) -> None:
    """Refuse to resume or reuse a store whose source folder holds other files now."""
    cfg_file = out / "config.json"
    if not cfg_file.is_file():
        return
    then = (read_json(cfg_file).get("source") or {}).get("fingerprint")
    change = describe_change(then, source.get("fingerprint"))
    if change:
        raise SourceChanged(f"the image source {source['description']} changed since store "
                            f"{out} was harvested ({change}); delete the store or use a new "
                            "--out to harvest it again", change)


def _loop(model: InceptionV1, src, mine: list[int], writer: ShardWriter, result: HarvestResult,
          *, layers: list[str], shapes: dict, sampling: str, n_samples: int, aligned: bool,
          seed: int, dtype: str, batch_size: int, workers: int, paper_compat: bool,
          device: torch.device, channels_last: bool, show: bool) -> None:
    """Decode (worker processes) -> forward once -> sample -> buffer; shards flush as they fill."""
    skips = _OrderedSkips()
    result.skips = skips
    hashed = local_files(src) is not None  # files just decoded: hashed from the page cache
    groups = sampling_groups(layers, shapes, aligned)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    batches = iter_batches(src, model.variant, batch_size, workers, indices=mine,
                           paper_compat=paper_compat, skips=skips, with_skips=True)
    with torch.inference_mode(), progress(len(mine), "harvest", "img", disable=not show) as bar:
        for b in batches:  # streamed sources: workers' batches interleave, so skips come by index
            for idx, image_id, reason in b.skipped:
                writer.skip(idx, image_id, reason)
            if b.indices:
                x = b.images.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                acts = model(x, layers)
                vecs, provs, bad = sample_batch(acts, b.indices, groups, shapes, sampling,
                                                 n_samples, seed, torch_dtype)
                for i, idx in enumerate(b.indices):
                    if bad[i]:
                        skips.add_unqueued(bad[i], b.image_ids[i])
                        writer.skip(idx, b.image_ids[i], bad[i])
                        continue
                    writer.add(idx, b.image_ids[i], b.labels[i],
                               {k: vecs[k][i] for k in layers}, {k: provs[k][i] for k in layers})
                    digest = record_digest(src, idx) if hashed else None
                    if digest is not None:
                        result.contents[idx] = digest
                    result.vectors += sum(len(vecs[k][i]) for k in layers)
            bar.update(len(b.indices) + len(b.skipped), vectors=result.vectors,
                       skipped=skips.total, shards=writer.written_shards)
    result.images = len(mine)
    if skips.total:
        log.warning("harvest: %s", skips.summary())
