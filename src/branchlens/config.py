"""The ground floor of the run configuration: names, errors and checks every block shares.

It imports nothing of branchlens, so any library or stage can use it. The blocks themselves
(each setting's default and its check, and which settings change no artifact) are the
dataclasses of :mod:`branchlens.settings`; :mod:`branchlens.schema` adds the checks that need a
library and validates whole configs: presets, ``--set`` overrides and ``--config`` files all go
through :func:`branchlens.schema.validate_config`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any

STAGES = ("harvest", "train", "analyze", "visualize", "examples", "circuits", "report")
BLOCKS = ("harvest", "sae", "train", "analyze", "visualize", "examples", "circuits", "report")
TOP_LEVEL: dict[str, Any] = {"source": str | None, "variant": str, "seed": int, "preset": str,
                             "paper_compat": bool, "stages": list[str] | None}
# Set by the run itself (seed, device, weights, the run folder, its log), never by a config
# block; a block's dataclass still holds them as the defaults of its stage run alone.
RUN_OWNED = ("seed", "device", "weights", "run_dir", "layer", "up", "down", "out", "source",
             "latents", "show_progress", "log")
# Counts that must be at least 1, in whichever block has them.
POSITIVE_COUNTS = ("batch_size", "steps", "size", "n_latents", "n_top", "n_strips", "n_images",
                   "n_perm", "curve_reps", "cards_per_layer", "top", "top_images", "knn_k",
                   "limit", "top_k")


class ConfigError(ValueError):
    """A run configuration value is unknown, mistyped or out of range."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


SEED_LIMIT = 2**32  # numpy's RandomState (UMAP's random_state) takes no larger seed


def check_seed(seed: int, name: str = "seed") -> int:
    """Refuse a seed some RNG of a later stage would reject, before any stage has run."""
    require(0 <= seed < SEED_LIMIT, f"{name} must be in 0..{SEED_LIMIT - 1} "
            f"(0 <= seed < 2**32), got {seed}")
    return seed


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


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def fields_of(target: Any) -> dict[str, Any]:
    """Settable key -> type hint of a dataclass or a stage function (run-owned keys left out)."""
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        names = [f.name for f in dataclasses.fields(target)]
    else:
        names = [p for p in inspect.signature(target).parameters]
    return {n: hints.get(n, Any) for n in names if n not in RUN_OWNED}


def check_values(block: str, values: Any, schema: dict[str, Any]) -> None:
    """Refuse unknown keys, wrong types and counts below 1 of one block, given its schema."""
    require(isinstance(values, dict), f"{block} must be a mapping of settings, got {values!r}")
    for key, value in values.items():
        require(key in schema, f"unknown setting {block}.{key}; valid: {', '.join(schema)}")
        require(conforms(value, schema[key]), f"{block}.{key} must be "
                f"{type_name(schema[key])}, got {value!r} ({type(value).__name__})")
        if key in POSITIVE_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            require(value >= 1, f"{block}.{key} must be >= 1, got {value}")


def check_stages(stages: list[str] | None) -> None:
    """Refuse unknown stage names (a typo would otherwise run nothing and say 'finished')."""
    bad = [s for s in stages or [] if s not in STAGES]
    require(not bad, f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
    require(stages is None or len(stages) > 0, f"no stages given; valid: {', '.join(STAGES)}")


def parse_set(item: str) -> tuple[str, str, Any]:
    """``BLOCK.KEY=VALUE`` with a JSON value (bare words are strings) -> (block, key, value)."""
    import json

    key, eq, raw = item.partition("=")
    block, dot, name = key.partition(".")
    require(bool(eq and dot and block and name),
            f"--set wants STAGE.KEY=VALUE, got {item!r}; blocks: {', '.join(BLOCKS)}")
    require(block in BLOCKS, f"unknown block {block!r} in --set {item!r}; valid: "
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
    require(isinstance(doc, dict), f"{p} must hold a table/object shaped like a preset")
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


# Moved to branchlens.schema (it reads the libraries, which import this module) and to
# branchlens.settings (the blocks); kept for one release: `from branchlens.config import
# check_block` still works.
_MOVED = ("HarvestConfig", "SAEOptions", "SCHEMA", "block_fields", "check_block",
          "validate_config")


def __getattr__(name: str) -> Any:
    if name == "NON_ARTIFACT":
        from branchlens.settings import NON_ARTIFACT

        return NON_ARTIFACT
    if name in _MOVED:
        from branchlens import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
