"""One validated run configuration: the stage dataclasses and signatures are its schema.

Presets, ``--set`` overrides and ``--config`` files (TOML, JSON, or a run's ``run.json``) all
go through :func:`validate_config`, which refuses unknown blocks, unknown keys, wrong types and
out-of-range values up front, naming the valid choices, so a typo can never be accepted and
silently ignored.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("harvest", "train", "analyze", "visualize", "examples", "circuits", "report")
BLOCKS = ("harvest", "sae", "train", "analyze", "visualize", "examples", "circuits", "report")
TOP_LEVEL: dict[str, Any] = {"source": str | None, "variant": str, "seed": int, "preset": str,
                             "paper_compat": bool, "stages": list[str] | None}
# Set by the run itself (seed, device, weights, the run folder), never by a config block.
RUN_OWNED = ("seed", "device", "weights", "run_dir", "layer", "up", "down", "out", "source",
             "latents", "show_progress")
# Settings that change no artifact a later stage reads: left out of the stage hashes (pipeline)
# and of an SAE's resume key (train), so changing one re-runs and deletes nothing. ``train.plot``
# only draws the training curve (``sae/<layer>/metrics.png``, which no stage reads; turning it on
# for a finished SAE draws nothing), and ``report.cards_per_layer`` is accepted for old configs
# but ignored by the report.
NON_ARTIFACT: dict[str, tuple[str, ...]] = {
    "train": ("progress", "plot", "device", "keep_optimizer"),
    "report": ("cards_per_layer",),
}
# Counts that must be at least 1 in the blocks whose schema is a function signature.
POSITIVE_COUNTS = ("batch_size", "steps", "size", "n_latents", "n_top", "n_strips", "n_images",
                   "n_perm", "curve_reps", "cards_per_layer", "top", "top_images", "knn_k",
                   "limit", "top_k")


class ConfigError(ValueError):
    """A run configuration value is unknown, mistyped or out of range."""


@dataclass
class HarvestConfig:
    """What ``branchlens run`` harvests (the store's own config is derived from it)."""

    layers: list[str] = field(default_factory=lambda: [
        "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"])
    sampling: str = "norm"
    samples_per_image: int = 10
    aligned: bool = False
    dtype: str = "fp16"
    batch_size: int = 32
    flip: bool = False
    shard_size: int = 1000
    limit: int | None = None

    def __post_init__(self) -> None:
        from branchlens.harvest import SAMPLING_METHODS, parse_layers
        from branchlens.store import STORAGE_DTYPES

        parse_layers(self.layers)
        _check(self.sampling in SAMPLING_METHODS,
               f"harvest.sampling must be one of {SAMPLING_METHODS}, got {self.sampling!r}")
        _check(self.dtype in STORAGE_DTYPES,
               f"harvest.dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        for name in ("samples_per_image", "batch_size", "shard_size"):
            _check(getattr(self, name) >= 1, f"harvest.{name} must be >= 1")
        _check(self.limit is None or self.limit >= 1, "harvest.limit must be >= 1")


@dataclass
class SAEOptions:
    """The ``sae`` block: architecture choices (widths come from the layer). Feeds ``train``."""

    expansion: int = 16
    k: int = 32
    decoder: str = "untied"
    aux: bool | None = None
    k_aux: int = 512
    aux_coef: float = 1 / 32
    dead_after: int | None = None
    loss: str = "fvu"
    b_pre_init: str = "median"

    def __post_init__(self) -> None:
        from branchlens.sae import SAEConfig

        _check(self.expansion >= 1, f"sae.expansion must be >= 1, got {self.expansion}")
        _check(self.k >= 1, f"sae.k must be >= 1, got {self.k}")
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw.pop("expansion")
        SAEConfig(d_in=self.k, n_latents=self.k * self.expansion, **kw)  # its own range checks

    def sae_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`SAEConfig.for_layer` besides the expansion."""
        kw = dataclasses.asdict(self)
        kw.pop("expansion")
        return kw


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


SEED_LIMIT = 2**32  # numpy's RandomState (UMAP's random_state) takes no larger seed


def check_seed(seed: int, name: str = "seed") -> int:
    """Refuse a seed some RNG of a later stage would reject, before any stage has run."""
    _check(0 <= seed < SEED_LIMIT, f"{name} must be in 0..{SEED_LIMIT - 1} "
           f"(0 <= seed < 2**32), got {seed}")
    return seed


def _train_cls() -> type:
    from branchlens.train import TrainConfig

    return TrainConfig


def _analyze_cls() -> type:
    from branchlens.analysis.driver import AnalysisConfig

    return AnalysisConfig


def _stage_fn(name: str) -> Callable[[], Callable]:
    def get() -> Callable:
        from branchlens.viz import stages

        return getattr(stages, name)
    return get


def _report_fn() -> Callable:
    from branchlens.report import build_report

    return build_report


SCHEMA: dict[str, Callable[[], Any]] = {
    "harvest": lambda: HarvestConfig, "sae": lambda: SAEOptions, "train": _train_cls,
    "analyze": _analyze_cls, "visualize": _stage_fn("visualize_stage"),
    "examples": _stage_fn("examples_stage"), "circuits": _stage_fn("circuits_stage"),
    "report": _report_fn,
}


def block_fields(block: str) -> dict[str, Any]:
    """Settable key -> type hint of one block, read from its dataclass or function."""
    target = SCHEMA[block]()
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        names = [f.name for f in dataclasses.fields(target)]
    else:
        names = [p for p in inspect.signature(target).parameters]
    return {n: hints.get(n, Any) for n in names if n not in RUN_OWNED}


def conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint (bool is not int; floats must be finite)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return not args or all(conforms(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_block(block: str, values: Any) -> None:
    """Refuse unknown keys, wrong types and out-of-range values of one block."""
    _check(isinstance(values, dict), f"{block} must be a mapping of settings, got {values!r}")
    schema = block_fields(block)
    for key, value in values.items():
        _check(key in schema, f"unknown setting {block}.{key}; valid: {', '.join(schema)}")
        _check(conforms(value, schema[key]), f"{block}.{key} must be {_type_name(schema[key])}, "
               f"got {value!r} ({type(value).__name__})")
        if key in POSITIVE_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            _check(value >= 1, f"{block}.{key} must be >= 1, got {value}")
    target = SCHEMA[block]()
    if dataclasses.is_dataclass(target):
        try:
            target(**values)  # the dataclass's own range checks
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{block}: {e}") from e


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a whole run configuration; returns it unchanged or raises :class:`ConfigError`."""
    from branchlens.variants import VARIANTS

    for key, value in cfg.items():
        if key in BLOCKS:
            check_block(key, value)
            continue
        _check(key in TOP_LEVEL, f"unknown config key {key!r}; valid blocks: "
               f"{', '.join(BLOCKS)}; valid top-level keys: {', '.join(TOP_LEVEL)}")
        _check(conforms(value, TOP_LEVEL[key]),
               f"{key} must be {_type_name(TOP_LEVEL[key])}, got {value!r}")
    if "seed" in cfg:
        check_seed(cfg["seed"])
    _check(cfg.get("variant") in VARIANTS,
           f"unknown variant {cfg.get('variant')!r}; choose from {sorted(VARIANTS)}")
    _check_layers(cfg["variant"], HarvestConfig(**cfg.get("harvest", {})).layers)
    check_stages(cfg.get("stages"))
    return cfg


def _check_layers(variant: str, layers: list[str]) -> None:
    from branchlens.model import layer_names

    valid = layer_names(variant)
    bad = [x for x in layers if x not in valid]
    _check(not bad, f"unknown layer(s) {bad} for {variant}; e.g. {', '.join(valid[-12:])}")


def check_stages(stages: list[str] | None) -> None:
    """Refuse unknown stage names (a typo would otherwise run nothing and say 'finished')."""
    bad = [s for s in stages or [] if s not in STAGES]
    _check(not bad, f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
    _check(stages is None or len(stages) > 0, f"no stages given; valid: {', '.join(STAGES)}")


def parse_set(item: str) -> tuple[str, str, Any]:
    """``BLOCK.KEY=VALUE`` with a JSON value (bare words are strings) -> (block, key, value)."""
    import json

    key, eq, raw = item.partition("=")
    block, dot, name = key.partition(".")
    _check(bool(eq and dot and block and name),
           f"--set wants STAGE.KEY=VALUE, got {item!r}; blocks: {', '.join(BLOCKS)}")
    _check(block in BLOCKS, f"unknown block {block!r} in --set {item!r}; valid: "
           f"{', '.join(BLOCKS)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--set {item!r}: non-finite numbers are not allowed")
    return block, name, value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A ``.toml`` or ``.json`` file shaped like a preset, or a run's ``run.json`` (its recorded
    config), as overrides for :func:`branchlens.pipeline.make_config` (validated there)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
    else:
        import json

        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("stages"), dict) and \
            isinstance(doc.get("config"), dict):
        doc = doc["config"]  # a run record: repeat that run
    _check(isinstance(doc, dict), f"{p} must hold a table/object shaped like a preset")
    return doc


def to_toml(cfg: dict[str, Any]) -> str:
    """A config as TOML (top-level keys, then one table per block); ``None`` values are
    written as comments, since TOML has no null."""
    import json

    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, float) else repr(v)

    def lines(d: dict[str, Any]) -> list[str]:
        return [f"# {k} = (none)" if v is None else f"{k} = {value(v)}" for k, v in d.items()
                if not isinstance(v, dict)]

    out = lines(cfg)
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += ["", f"[{k}]", *lines(v)]
    return "\n".join(out) + "\n"
