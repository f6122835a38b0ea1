"""The ``analyze`` block: every setting of the analysis, its default and its check, once.

:mod:`branchlens.schema` reads the block's keys from :class:`AnalysisConfig`; the analyze stage
and the driver take one. :class:`AnalysisError` is what a run that cannot be analysed as it is
raises (the message names the layer and the command to run).
"""

from __future__ import annotations

from dataclasses import dataclass


class AnalysisError(ValueError):
    """A run cannot be analysed as it is; the message names the layer and what to run."""


@dataclass
class AnalysisConfig:
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
        from branchlens.config import check_seed

        # below 1e-6 the permutation cap ⌈20·m/q⌉ is astronomically large (or overflows)
        if not 1e-6 <= self.q < 1:
            raise ValueError(f"analyze.q must be in [1e-06, 1), got {self.q}")
        check_seed(self.seed)
        if self.embed not in ("auto", "umap", "pca", "none"):
            raise ValueError(f"analyze.embed must be auto | umap | pca | none, got {self.embed!r}")
        for name in ("n_perm", "n_strata", "curve_reps", "control_latents", "top", "top_images",
                     "attribution_top", "min_images", "bootstrap", "knn_k", "batch_size",
                     "relabel_replicates", "relabel_perm", "power_planted", "covariance_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"analyze.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_perm is not None and self.max_perm < self.n_perm:
            raise ValueError("analyze.max_perm must be >= analyze.n_perm")
        if self.match_shifts < 0 or not -1 <= self.match_threshold <= 1:
            raise ValueError("analyze.match_shifts must be >= 0 and match_threshold in [-1, 1]")
