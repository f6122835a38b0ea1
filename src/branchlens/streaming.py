"""Streamed image sources: WebDataset shards and Hugging Face datasets, read by their libraries.

A :class:`StreamSource` is a list of *units* (one tar shard; one block of streamed rows), each
read front to back and never by random access. The store records images by a dense global index,
the position in the concatenation of the units, so each unit's size must be known before the
harvest: tar shards are counted once (headers only, cached per local file) and counting stops at
``limit``. Ranks and DataLoader workers take whole units (:func:`branchlens.data.split_for_rank`,
:func:`unit_share`), so no sample is read, decoded or stored twice.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from branchlens.data import IMAGE_SUFFIXES, BadImage, ImageSource, RawRecord
from branchlens.variants import Variant, get_variant

log = logging.getLogger("branchlens.data")

HF_UNIT_ROWS = 1000  # rows per unit of a streamed HF split (the split granularity of ranks)
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # pipe:, http(s):, s3:, gs:, hf: ...


def missing_extra(lib: str, extra: str) -> ImportError:
    return ImportError(f"{lib} is not installed: pip install 'branchlens[{extra}]'")


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


def unit_share(units: Sequence[int]) -> list[int]:
    """The units of this DataLoader worker: every ``num_workers``-th, as webdataset splits."""
    info = torch.utils.data.get_worker_info()
    return list(units) if info is None else list(units[info.id::info.num_workers])


# -- WebDataset ---------------------------------------------------------------------------------

@dataclass
class _NoImage:
    key: str

    def __call__(self) -> Any:
        raise BadImage("no_image", f"sample {self.key} has no image member")


def _is_local(url: str) -> bool:
    return not _REMOTE.match(url) or url.startswith("file:")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file:")).expanduser()


class WebDatasetSource(StreamSource):
    """WebDataset shards, as ``webdataset`` expands and opens them (braces, ``::``, URLs,
    ``pipe:``). Samples are webdataset's key groups; the first image member is the image, a
    ``cls`` member the label. A sample without an image is a counted skip, not a shift of ids.
    """

    def __init__(self, spec: str, limit: int | None = None):
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise missing_extra("webdataset", "webdataset") from None
        urls: list[str] = []
        for url in expand_urls(spec):
            if _is_local(url) and not _local_path(url).exists() and glob.has_magic(url):
                urls += sorted(glob.glob(str(_local_path(url))))  # a shell-style pattern
            else:
                urls.append(url)
        if not urls:
            raise FileNotFoundError(f"wds:{spec} names no shard")
        missing = [u for u in urls if _is_local(u) and not _local_path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"wds:{spec}: {len(missing)} of {len(urls)} shards not found "
                                    f"(first: {missing[0]})")
        self.urls, self.limit = urls, limit
        self.description = f"wds:{spec}"

    @property
    def n_units(self) -> int:
        return len(self.urls)

    def count_units(self) -> list[int]:
        sizes, total = [], 0
        for url in self.urls:
            if self.limit is not None and total >= self.limit:
                break
            n = count_shard(url)
            if self.limit is not None:
                n = min(n, self.limit - total)
            sizes.append(n)
            total += n
        return sizes

    def unit_records(self, u: int) -> Iterator[RawRecord]:
        from webdataset.tariterators import tarfile_samples

        url, size = self.urls[u], self.unit_sizes[u]
        name = url.rstrip("/").rsplit("/", 1)[-1]
        for pos, sample in enumerate(tarfile_samples([{"url": url}])):
            if pos >= size:
                return
            key = sample["__key__"]
            image = next((v for k, v in sample.items() if not k.startswith("__")
                          and f".{k.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES), None)
            yield RawRecord(f"wds:{name}:{key}", _cls_label(sample.get("cls")),
                            _NoImage(key) if image is None else image)


def _cls_label(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


_COUNT_CACHE: dict[str, int] = {}


def _cache_file() -> Path:
    root = os.environ.get("BRANCHLENS_CACHE") or Path.home() / ".cache" / "branchlens"
    return Path(root) / "wds-counts.json"


def count_shard(url: str) -> int:
    """Samples in one shard, grouped exactly as webdataset groups them (headers only: member
    data is skipped, not decoded). Local shards are cached by path, size and mtime."""
    key = url
    if _is_local(url):
        st = _local_path(url).stat()
        key = f"{_local_path(url).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    disk: dict[str, int] = {}
    if _is_local(url):
        try:
            disk = json.loads(_cache_file().read_text())
        except (OSError, ValueError):
            disk = {}
        if isinstance(disk.get(key), int):
            _COUNT_CACHE[key] = disk[key]
            return disk[key]
    n = _count_keys(url)
    _COUNT_CACHE[key] = n
    if _is_local(url):
        disk[key] = n
        try:
            from branchlens.artifacts import write_json

            write_json(_cache_file(), disk)
        except OSError:
            pass  # a read-only home only costs a recount
    return n


def _count_keys(url: str) -> int:
    from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

    state: dict[str, Any] = {"key": None, "n": 0}

    def select(fname: str) -> bool:  # sees every member name; reads no member data
        prefix, _ = base_plus_ext(fname)
        if prefix is not None and prefix != state["key"]:
            state["key"] = prefix
            state["n"] += 1
        return False

    for _ in tar_file_expander(url_opener([{"url": url}]), select_files=select):
        state["key"] = None  # end of shard: webdataset never groups across shards
    return state["n"]


# -- Hugging Face datasets ----------------------------------------------------------------------

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
    mapping = label_mapping(features.get(label_key) if label_key else None, variant, spec)
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


def _imagenet_lookup(variant: str | Variant) -> dict[str, int] | None:
    """wnid, full class string and every unambiguous synonym (lower case) -> class index."""
    from importlib.resources import files

    from branchlens.variants import LABEL_CLASSES

    lines = [ln for ln in (files("branchlens") / "resources" / LABEL_CLASSES).read_text()
             .splitlines() if ln.strip()]
    out: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i, ln in enumerate(lines):
        wnid, _, names = ln.partition(" ")
        out[wnid.lower()] = i
        out[names.strip().lower()] = i
        for syn in names.split(","):
            syn = syn.strip().lower()
            seen[syn] = seen.get(syn, 0) + 1
            out.setdefault(f"syn:{syn}", i)
    for syn, n in seen.items():
        if n == 1:
            out.setdefault(syn, out[f"syn:{syn}"])
    return {k: v for k, v in out.items() if not k.startswith("syn:")}


def label_mapping(feature: Any, variant: str | Variant, spec: str) -> dict[int, int] | None:
    """ClassLabel id -> the variant's class index, by wnid or name; ``None`` keeps labels off.

    Plain integer labels are taken as the variant's own ids (``{}`` means identity)."""
    import datasets

    if feature is None:
        return None
    if not isinstance(feature, datasets.ClassLabel):
        return {}
    lookup = _imagenet_lookup(variant) or {}
    names = feature.names
    mapped = {i: lookup.get(n.strip().lower().replace("_", " "), lookup.get(n.strip().lower()))
              for i, n in enumerate(names)}
    bad = [names[i] for i, j in mapped.items() if j is None]
    if bad:
        log.warning("hf:%s: %d of %d class names are not %s classes (e.g. %s); labels ignored",
                    spec, len(bad), len(names), get_variant(variant).name, ", ".join(bad[:3]))
        return None
    return {i: int(j) for i, j in mapped.items() if j is not None}


def _row_record(row: dict, i: int, desc: str, image_key: str, label_key: str | None,
                mapping: dict[int, int] | None) -> RawRecord:
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
                 mapping: dict[int, int] | None):
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
                 label_key: str | None, mapping: dict[int, int] | None):
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
        # .iter(): plain iteration would shard the stream again inside a DataLoader worker
        for batch in part.iter(batch_size=64):
            for j in range(len(next(iter(batch.values()), []))):
                yield _row_record({k: v[j] for k, v in batch.items()}, pos, self.description,
                                  self.image_key, self.label_key, self.mapping)
                pos += 1


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
        from branchlens.data import _flipped

        size, pos = self.unit_sizes[u], 0
        for rec in self.source.unit_records(u):
            for view in (rec, _flipped(rec)):
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
        from branchlens.data import _decode_one

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
                        yield _decode_one(g, rec, self.variant, self.paper_compat,
                                          self.max_pixels)
            except Exception as e:  # a broken or unreachable shard: its rest is skipped
                reason = f"unit_error:{type(e).__name__}"
                log.warning("%s: unit %d failed after %d records (%s: %s)",
                            self.source.description, u, len(seen), type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
            for g in want:
                if g not in seen:
                    yield g, f"{self.source.description}:{g}", None, None, reason


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
