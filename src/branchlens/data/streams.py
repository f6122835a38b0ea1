"""Streamed sources: units read front to back, never by random access (``hf:``, ``wds:``).

A :class:`StreamSource` is a list of *units* (one tar shard; one block of streamed rows), each
read front to back. The store records images by a dense global index, the position in the
concatenation of the units, so each unit's size must be known before the harvest (counting stops
at ``limit``). Ranks and DataLoader workers take whole units
(:func:`branchlens.data.split_for_rank`, :func:`unit_share`), so no sample is read, decoded or
stored twice. The two kinds are :mod:`branchlens.data.wds` and :mod:`branchlens.data.hf`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence

import torch

from branchlens.data.decode import decode_one, flipped
from branchlens.data.records import ImageSource, RawRecord
from branchlens.variants import Variant

log = logging.getLogger("branchlens.data")  # one logger for every source kind


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


def is_stream(src: ImageSource) -> bool:
    """Whether ``src`` is read unit by unit (then batches interleave across workers)."""
    return isinstance(src, StreamSource)


def unit_share(units: Sequence[int]) -> list[int]:
    """The units of this DataLoader worker: every ``num_workers``-th, as webdataset splits."""
    info = torch.utils.data.get_worker_info()
    return list(units) if info is None else list(units[info.id::info.num_workers])


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
