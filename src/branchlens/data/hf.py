"""Hugging Face datasets as an image source (``hf:NAME[:SPLIT][?image=KEY&label=KEY]``).

A local ``save_to_disk`` / imagefolder / parquet folder, or a hub dataset: random access
(:class:`HFSource`), or streamed under a limit in units of :data:`HF_UNIT_ROWS` rows
(:class:`HFStreamSource`). Class names become ILSVRC labels only where they name one class.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchlens.data.records import ImageSource, RawRecord
from branchlens.data.streams import StreamError, StreamSource, log, missing_extra
from branchlens.variants import Variant, label_wnids

HF_UNIT_ROWS = 1000  # rows per unit of a streamed HF split (the split granularity of ranks)


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
