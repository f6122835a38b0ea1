"""The run configuration's schema: whole configs and each block checked up front.

Each block's keys, defaults and own checks are its dataclass in :mod:`branchlens.settings`
(the ground floor). This module sits above the libraries, so it adds the checks against their
own facts (the harvest's layer list and sampling methods, the store's dtypes, the SAE's ranges)
and the variant's layer names. Presets, ``--set`` overrides and ``--config`` files all go
through :func:`validate_config`, which refuses unknown blocks, unknown keys, wrong types and
out-of-range values, naming the valid choices, so a typo can never be accepted and silently
ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from branchlens import settings
from branchlens.config import (
    ConfigError,
    check_seed,
    check_stages,
    require,
)
from branchlens.settings import BLOCK_CLASSES, HarvestConfig, SAEOptions, block_fields

__all__ = ["SCHEMA", "HarvestConfig", "SAEOptions", "block_fields", "check_block",
           "library_check", "validate_config"]

# block -> its dataclass (a callable, as when the schema was read from the stages lazily)
SCHEMA: dict[str, Callable[[], type]] = {b: (lambda c=c: c) for b, c in BLOCK_CLASSES.items()}


def _harvest_library(h: HarvestConfig) -> None:
    from branchlens.harvest import SAMPLING_METHODS, parse_layers
    from branchlens.store import STORAGE_DTYPES

    parse_layers(h.layers)
    require(h.sampling in SAMPLING_METHODS,
            f"harvest.sampling must be one of {SAMPLING_METHODS}, got {h.sampling!r}")
    require(h.dtype in STORAGE_DTYPES,
            f"harvest.dtype must be one of {sorted(STORAGE_DTYPES)}, got {h.dtype!r}")


def _sae_library(s: SAEOptions) -> None:
    from branchlens.sae import SAEConfig

    SAEConfig(d_in=s.k, n_latents=s.k * s.expansion, **s.sae_kwargs())  # its own range checks


# The checks of a block against its library's facts (the library stays their one home).
LIBRARY_CHECKS: dict[str, Callable[[Any], None]] = {"harvest": _harvest_library,
                                                    "sae": _sae_library}


def library_check(block: str, value: Any) -> None:
    """Check a built block against its library (``ValueError`` in the library's words)."""
    if block in LIBRARY_CHECKS:
        LIBRARY_CHECKS[block](value)


def check_block(block: str, values: Any) -> None:
    """Refuse unknown keys, wrong types and out-of-range values of one block: the block's own
    checks (:func:`branchlens.settings.check_block`), then its library's."""
    settings.check_block(block, values)
    try:
        library_check(block, BLOCK_CLASSES[block](**values))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{block}: {e}") from e


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a whole run configuration; returns it unchanged or raises :class:`ConfigError`."""
    from branchlens.variants import VARIANTS

    settings.check_config_keys(cfg, check=check_block)  # with the library checks
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
