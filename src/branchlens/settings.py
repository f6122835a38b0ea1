"""Every config block as a dataclass: each setting's default and its check, written once.

One class per block of a run configuration (``harvest``, ``sae``, ``train``, ``analyze``,
``visualize``, ``examples``, ``circuits``, ``report``; :data:`BLOCK_CLASSES`). A block's keys
are its fields minus the ones the run itself sets (:data:`branchlens.config.RUN_OWNED`: seed,
device, weights, ...), which the classes still hold as the defaults of a stage run alone. A
field made with :func:`non_artifact` changes no artifact a later stage reads: it stays out of
the stage hashes and of an SAE's resume key (:data:`NON_ARTIFACT` is read from those marks).

This is the ground floor: it imports nothing of branchlens but :mod:`branchlens.config`, so
the CLI reads its defaults without torch, and every stage and library can take these classes.
Checks against a library's own facts (the harvest's sampling methods, the store's dtypes, the
SAE's ranges) are not here but in :mod:`branchlens.schema`, which sits above those libraries;
the stages keep their run-time checks of ``visualize.select``, ``examples.select`` and
``examples.gallery_size``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchlens.config import (
    BLOCKS,
    TOP_LEVEL,
    ConfigError,
    check_seed,
    check_values,
    conforms,
    fields_of,
    require,
    type_name,
)

NO_ARTIFACT = "non_artifact"  # the field metadata key of non_artifact()
MIXED4 = ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e")  # the paper's blocks
RUN_DEVICE = "auto"  # where `branchlens run` and a stage command run alone compute
DECAYS = ("none", "linear", "cosine")
EMBEDS = ("auto", "umap", "pca", "none")


def non_artifact(default: Any) -> Any:
    """A field whose value changes no artifact a later stage reads (see the module doc)."""
    return field(default=default, metadata={NO_ARTIFACT: True})


def _require(ok: bool, message: str) -> None:
    """A range check of train/analyze/sae: ``ValueError`` (``check_block`` names the block)."""
    if not ok:
        raise ValueError(message)


@dataclass
class HarvestConfig:
    """What ``branchlens run`` harvests (the store's own config is derived from it)."""

    layers: list[str] = field(default_factory=lambda: list(MIXED4))
    sampling: str = "norm"
    samples_per_image: int = 10
    aligned: bool = False
    dtype: str = "fp16"
    batch_size: int = 32
    flip: bool = False
    shard_size: int = 1000
    limit: int | None = None

    def __post_init__(self) -> None:
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
        require(self.expansion >= 1, f"sae.expansion must be >= 1, got {self.expansion}")
        require(self.k >= 1, f"sae.k must be >= 1, got {self.k}")

    def sae_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`SAEConfig.for_layer` besides the expansion."""
        kw = dataclasses.asdict(self)
        kw.pop("expansion")
        return kw


@dataclass
class TrainConfig:
    """Training settings (``train.*``), shared by CLI, pipeline and API. Its fields (but the
    non-artifact ones) are an SAE's resume key: adding one retrains every SAE."""

    batch_size: int = 4096
    lr: float = 4e-4
    epochs: float = 10.0  # used when steps is None
    steps: int | None = None
    warmup_steps: int = 100
    decay: str = "linear"  # "none" | "linear" | "cosine": to 0 over the last decay_frac
    decay_frac: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    init_sample: int = 65536  # vectors for the input scale and the geometric median
    heldout_fraction: float = 0.1
    eval_max_vectors: int = 200_000
    # only draws sae/<layer>/metrics.png, which no stage reads (a finished SAE draws nothing)
    plot: bool = non_artifact(True)
    progress: bool = non_artifact(True)
    # "auto" | "cpu" | "cuda[:N]": where the SAE and its batches live
    device: str = non_artifact("cpu")
    # keep Adam's state (2× the weights) once training finished
    keep_optimizer: bool = non_artifact(False)
    # torch threads; None: OMP_NUM_THREADS, else the usable cores
    threads: int | None = non_artifact(None)

    def __post_init__(self) -> None:
        """Refuse values that would divide by zero, never train, or train on NaN."""
        self.betas = tuple(self.betas)  # type: ignore[assignment]  (JSON gives a list)
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"lr must be finite and > 0, got "
                 f"{self.lr}")
        _require(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(math.isfinite(self.epochs) and self.epochs > 0,
                 f"epochs must be finite and > 0, got {self.epochs}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.decay in DECAYS, f"decay must be one of {DECAYS}, got {self.decay!r}")
        _require(0 <= self.decay_frac <= 1, f"decay_frac must be in [0, 1], got {self.decay_frac}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"betas must be two numbers in [0, 1), got {self.betas}")
        _require(math.isfinite(self.eps) and self.eps > 0, f"eps must be > 0, got {self.eps}")
        check_seed(self.seed)
        _require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _require(self.ckpt_every >= 1, f"ckpt_every must be >= 1, got {self.ckpt_every}")
        _require(self.init_sample >= 1, f"init_sample must be >= 1, got {self.init_sample}")
        _require(0 <= self.heldout_fraction < 1,
                 f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        _require(self.eval_max_vectors >= 1,
                 f"eval_max_vectors must be >= 1, got {self.eval_max_vectors}")
        _require(self.threads is None or self.threads >= 1,
                 f"threads must be >= 1 (or None: the usable cores), got {self.threads}")


@dataclass
class AnalysisConfig:
    """The ``analyze`` block; ``summary.json`` records all of it (``config``)."""

    q: float = 0.05  # BH false discovery rate, per branch across tested latents
    n_perm: int = 1000  # first round of channel permutations per latent (then adaptive)
    max_perm: int | None = None  # cap of the adaptive refinement (default ⌈20·m/q⌉)
    n_strata: int = 16  # activation-std strata of the scale rule
    curve_reps: int = 200  # permutation replicates for the paper's sorted-ratio curve
    control_latents: int = 2048  # null directions per control (a random subset of latents)
    relabel_replicates: int = 40  # random channel→branch partitions of the relabelling null
    relabel_perm: int = 200  # permutations per p-value inside the relabelling null
    power_planted: int = 64  # planted latents per branch and boost for the power check
    covariance_rows: int = 20000  # held-out vectors for the data-covariance baseline
    top: int = 64  # top-activating held-out vectors kept per latent
    top_images: int = 16  # distinct top images per latent for categories
    attribution_top: int = 16  # top vectors for the data-side branch attribution
    min_images: int = 20  # distinct firing image groups needed to take part in matching
    match_threshold: float = 0.5  # floor of the correlation for a cross-layer pair
    match_shifts: int = 3  # shifted-image replicates of the matching null
    bootstrap: int = 2000  # image-cluster bootstrap replicates (category test)
    knn_k: int = 10
    embed: str = "auto"  # auto | umap | pca | none
    animal_group_min: float = 0.5  # highlighted group: ≥ this animal fraction of top images
    batch_size: int = 4096
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto: SAE encoding, permutations and kNN

    def __post_init__(self) -> None:
        # below 1e-6 the permutation cap ⌈20·m/q⌉ is astronomically large (or overflows)
        _require(1e-6 <= self.q < 1, f"analyze.q must be in [1e-06, 1), got {self.q}")
        check_seed(self.seed)
        _require(self.embed in EMBEDS,
                 f"analyze.embed must be auto | umap | pca | none, got {self.embed!r}")
        for name in ("n_perm", "n_strata", "curve_reps", "control_latents", "top", "top_images",
                     "attribution_top", "min_images", "bootstrap", "knn_k", "batch_size",
                     "relabel_replicates", "relabel_perm", "power_planted", "covariance_rows"):
            _require(getattr(self, name) >= 1,
                     f"analyze.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.max_perm is None or self.max_perm >= self.n_perm,
                 "analyze.max_perm must be >= analyze.n_perm")
        _require(self.match_shifts >= 0 and -1 <= self.match_threshold <= 1,
                 "analyze.match_shifts must be >= 0 and match_threshold in [-1, 1]")


# The three picture blocks hold their stage's parameters in its order (``visualize_stage``,
# ``examples_stage``, ``circuits_stage`` of ``branchlens.stages.visualize``/``examples``/
# ``circuits`` take their defaults from here); counts below 1 and wrong types are refused by
# check_block.

@dataclass
class VisualizeConfig:
    """The ``visualize`` block: feature visualizations of latents or channels."""

    latents: Sequence[int] | None = None
    n_latents: int = 16
    objective: str = "latent"
    branch: str | None = None
    size: int = 224
    steps: int = 512
    lr: float = 0.05
    seed: int = 0
    batch_size: int = 16
    weights: str | None = None
    device: str = RUN_DEVICE
    show_progress: bool = True
    redirect_relu_steps: int = 16
    select: str = "random"
    per_cell: int = 4
    pairs: int = 4
    branch_views: bool = True


@dataclass
class ExamplesConfig:
    """The ``examples`` block: top images, the gallery and strips of every latent."""

    source: str | None = None
    n_top: int = 16
    latents: Sequence[int] | None = None
    n_strips: int = 32
    maps: bool = True
    batch_size: int = 16
    limit: int | None = None
    weights: str | None = None
    device: str = RUN_DEVICE
    seed: int = 0
    show_progress: bool = True
    gallery: bool = True
    gallery_size: int = 12
    heldout: bool = True
    select: str = "random"
    per_cell: int = 4
    pairs: int = 4


@dataclass
class CircuitsConfig:
    """The ``circuits`` block: latent-to-latent attribution between two layers."""

    latents: Sequence[int] | None = None
    n_latents: int = 8
    n_images: int = 8
    flow_latents: int = 64
    n_perm: int = 1000
    top_k: int = 10
    ablate: int = 4
    source: str | None = None
    weights: str | None = None
    device: str = RUN_DEVICE
    batch_size: int = 16
    seed: int = 0
    show_progress: bool = True


@dataclass
class ReportConfig:
    """The ``report`` block. ``cards_per_layer`` is accepted for old configs and ignored
    (every latent is browsable), so it changes nothing."""

    out: str | Path | None = None
    cards_per_layer: int = non_artifact(48)


BLOCK_CLASSES: dict[str, type] = {
    "harvest": HarvestConfig, "sae": SAEOptions, "train": TrainConfig,
    "analyze": AnalysisConfig, "visualize": VisualizeConfig, "examples": ExamplesConfig,
    "circuits": CircuitsConfig, "report": ReportConfig,
}

# Settings that change no artifact a later stage reads, per block: left out of the stage
# hashes (pipeline) and of an SAE's resume key (train), so changing one re-runs and deletes
# nothing. Read from the fields' marks, in field order.
NON_ARTIFACT: dict[str, tuple[str, ...]] = {
    block: names for block, cls in BLOCK_CLASSES.items()
    if (names := tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(NO_ARTIFACT)))
}


def block_fields(block: str) -> dict[str, Any]:
    """Settable key -> type hint of one block, in field order (run-owned keys left out)."""
    return fields_of(BLOCK_CLASSES[block])


def check_block(block: str, values: Any) -> None:
    """Refuse unknown keys, wrong types, counts below 1 and the block's own out-of-range
    values (:class:`ConfigError`, naming the block). The library checks are
    :func:`branchlens.schema.check_block`'s."""
    check_values(block, values, block_fields(block))
    try:
        BLOCK_CLASSES[block](**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{block}: {e}") from e


def check_config_keys(cfg: dict[str, Any], check: Any = check_block, where: str = "") -> None:
    """Every block of ``cfg`` through ``check``, every other key a top-level key of its type
    (``where`` prefixes the messages, e.g. ``"preset 'demo': "``)."""
    for key, value in cfg.items():
        if key in BLOCKS:
            check(key, value)
            continue
        require(key in TOP_LEVEL, f"{where}unknown {'key' if where else 'config key'} {key!r}; "
                f"valid blocks: {', '.join(BLOCKS)}; valid top-level keys: {', '.join(TOP_LEVEL)}")
        require(conforms(value, TOP_LEVEL[key]),
                f"{where}{key} must be {type_name(TOP_LEVEL[key])}, got {value!r}")
