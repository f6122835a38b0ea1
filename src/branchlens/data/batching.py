"""Batches: a source decoded by DataLoader workers into model inputs, and shared out by rank.

Bad inputs become counted skips (:class:`~branchlens.data.records.SkipStats`), never NaNs or
exceptions. A streamed source is read unit by unit (:mod:`branchlens.data.streams`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from branchlens.data.decode import MAX_PIXELS, decode_one
from branchlens.data.records import ImageSource, SkipStats
from branchlens.data.streams import StreamedDecode, is_stream
from branchlens.variants import Variant, get_variant


def split_for_rank(src: ImageSource, indices: Sequence[int], world: int, rank: int
                   ) -> list[int]:
    """This rank's share of ``indices``: contiguous blocks; for a streamed source whole units
    (shards), so no rank reads another rank's shard."""
    indices = [int(i) for i in indices]
    if world <= 1:
        return indices
    if not is_stream(src):
        return [int(i) for i in np.array_split(np.asarray(indices, np.int64), world)[rank]]
    by_unit: dict[int, list[int]] = {}
    for i in indices:
        by_unit.setdefault(src.unit_of(i), []).append(i)
    units = sorted(by_unit)
    total, done, mine = len(indices), 0, []
    for u in units:  # balanced contiguous blocks of units by their image counts
        owner = min(world - 1, (2 * done + len(by_unit[u])) * world // (2 * total))
        if owner == rank:
            mine += by_unit[u]
        done += len(by_unit[u])
    return mine


@dataclass
class Batch:
    indices: list[int]  # positions in the source
    image_ids: list[str]
    labels: list[int | None]
    images: torch.Tensor  # [B, 3, H, W] model input
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (index, id, reason)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, indices: Sequence[int], variant: Variant,
                 paper_compat: bool, max_pixels: int):
        self.source, self.indices, self.variant = source, indices, variant
        self.paper_compat, self.max_pixels = paper_compat, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        return decode_one(i, self.source[i], self.variant, self.paper_compat, self.max_pixels)


def _collate(items):
    return items


def iter_batches(
    source: ImageSource,
    variant: str | Variant,
    batch_size: int = 32,
    workers: int = 0,
    indices: Sequence[int] | None = None,
    paper_compat: bool = False,
    skips: SkipStats | None = None,
    max_pixels: int = MAX_PIXELS,
    with_skips: bool = False,
) -> Iterator[Batch]:
    """Decoded, preprocessed batches; bad inputs are counted in ``skips``.

    Random-access sources come in index order. A streamed source is read unit by unit, each
    DataLoader worker reading its own units, so batches of different workers interleave; with
    ``with_skips`` every batch lists its skipped indices (a batch may then hold only skips),
    which is what an order-independent consumer needs.
    """
    v = get_variant(variant)
    indices = list(range(len(source))) if indices is None else list(indices)
    skips = skips if skips is not None else SkipStats()
    if is_stream(source):
        ds: torch.utils.data.Dataset = StreamedDecode(source, indices, v, paper_compat,
                                                      max_pixels)
        workers = min(workers, ds.n_units)
    else:
        ds = _Decoded(source, indices, v, paper_compat, max_pixels)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        persistent_workers=False, prefetch_factor=4 if workers else None)
    for items in loader:
        good, bad = [], []
        for i, image_id, label, x, reason in items:
            if reason is not None:
                skips.add(reason, image_id)
                bad.append((i, image_id, reason))
            else:
                good.append((i, image_id, label, x))
        if good or (with_skips and bad):
            images = torch.stack([g[3] for g in good]) if good else torch.empty(0)
            yield Batch([g[0] for g in good], [g[1] for g in good], [g[2] for g in good],
                        images, bad)
