"""The run configuration's schema: each block's keys and checks, read from the stage
dataclasses and signatures, so a stage's options are defined once, in its own signature.

This sits above the stages it reads (train, analysis, viz, report); the names and checks they
share are in :mod:`branchlens.config`, which imports none of them. Presets, ``--set`` overrides
and ``--config`` files all go through :func:`validate_config`, which refuses unknown blocks,
unknown keys, wrong types and out-of-range values up front, naming the valid choices, so a typo
can never be accepted and silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from branchlens.config import (
    BLOCKS,
    TOP_LEVEL,
    ConfigError,
    check_seed,
    check_stages,
    check_values,
    conforms,
    fields_of,
    require,
    type_name,
)


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
        require(self.sampling in SAMPLING_METHODS,
                f"harvest.sampling must be one of {SAMPLING_METHODS}, got {self.sampling!r}")
        require(self.dtype in STORAGE_DTYPES,
                f"harvest.dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        for name in ("samples_per_image", "batch_size", "shard_size"):
            require(getattr(self, name) >= 1, f"harvest.{name} must be >= 1")
        require(self.limit is None or self.limit >= 1, "harvest.limit must be >= 1")


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

        require(self.expansion >= 1, f"sae.expansion must be >= 1, got {self.expansion}")
        require(self.k >= 1, f"sae.k must be >= 1, got {self.k}")
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw.pop("expansion")
        SAEConfig(d_in=self.k, n_latents=self.k * self.expansion, **kw)  # its own range checks

    def sae_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`SAEConfig.for_layer` besides the expansion."""
        kw = dataclasses.asdict(self)
        kw.pop("expansion")
        return kw


def _train_cls() -> type:
    from branchlens.train import TrainConfig

    return TrainConfig


def _analyze_cls() -> type:
    from branchlens.analysis.driver import AnalysisConfig

    return AnalysisConfig


def _stage_fn(name: str) -> Callable[[], Callable]:
    def get() -> Callable:
        from branchlens.stages import viz as stages

        return getattr(stages, name)
    return get


def _report_fn() -> Callable:
    from branchlens.stages.report import build_report

    return build_report


SCHEMA: dict[str, Callable[[], Any]] = {
    "harvest": lambda: HarvestConfig, "sae": lambda: SAEOptions, "train": _train_cls,
    "analyze": _analyze_cls, "visualize": _stage_fn("visualize_stage"),
    "examples": _stage_fn("examples_stage"), "circuits": _stage_fn("circuits_stage"),
    "report": _report_fn,
}


def block_fields(block: str) -> dict[str, Any]:
    """Settable key -> type hint of one block, read from its dataclass or function."""
    return fields_of(SCHEMA[block]())


def check_block(block: str, values: Any) -> None:
    """Refuse unknown keys, wrong types and out-of-range values of one block."""
    check_values(block, values, block_fields(block))
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
        require(key in TOP_LEVEL, f"unknown config key {key!r}; valid blocks: "
                f"{', '.join(BLOCKS)}; valid top-level keys: {', '.join(TOP_LEVEL)}")
        require(conforms(value, TOP_LEVEL[key]),
                f"{key} must be {type_name(TOP_LEVEL[key])}, got {value!r}")
    if "seed" in cfg:
        check_seed(cfg["seed"])
    require(cfg.get("variant") in VARIANTS,
            f"unknown variant {cfg.get('variant')!r}; choose from {sorted(VARIANTS)}")
    _check_layers(cfg["variant"], HarvestConfig(**cfg.get("harvest", {})).layers)
    check_stages(cfg.get("stages"))
    return cfg


def _check_layers(variant: str, layers: list[str]) -> None:
    from branchlens.model import layer_names

    valid = layer_names(variant)
    bad = [x for x in layers if x not in valid]
    require(not bad, f"unknown layer(s) {bad} for {variant}; e.g. {', '.join(valid[-12:])}")
