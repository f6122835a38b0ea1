"""A run's latents as a notebook reads them: one layer's typed latent table and one latent.

:meth:`branchlens.run.Run.latents` and :meth:`~branchlens.run.Run.latent` build these from
``analysis/latents.csv``; a :class:`Latent` reaches back into its run for the SAE, the store and
the pictures (:mod:`branchlens.notebook` draws them). Both are re-exported by ``branchlens.run``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from branchlens.layout import ProvenanceError

if TYPE_CHECKING:  # annotations only: branchlens.run builds these
    from PIL import Image
    from torch import Tensor

    from branchlens.run import Run


class LatentTable(Sequence):
    """Typed rows of one layer's latent table; ``to_pandas()`` for a DataFrame."""

    def __init__(self, layer: str, rows: list[dict[str, Any]], branches: list[str]):
        self.layer, self.rows, self.branches = layer, rows, branches

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"LatentTable({self.layer!r}, {len(self)} latents, branches {self.branches})"

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []

    def column(self, name: str) -> np.ndarray:
        if name not in (self.rows[0] if self.rows else {}):
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        return np.array([r[name] for r in self.rows])

    def where(self, **equal: Any) -> LatentTable:
        """Rows whose columns equal the given values, e.g. ``where(dominant="5x5")``."""
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in equal.items())]
        return LatentTable(self.layer, rows, self.branches)

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("LatentTable.to_pandas needs pandas (pip install pandas); the "
                              "rows are plain dicts in .rows") from e
        return pd.DataFrame(self.rows).set_index("latent", drop=False)


@dataclass
class Latent:
    """One latent of one layer: its statistics (from the analysis) and its pictures."""

    run: Run
    layer: str
    index: int
    row: dict[str, Any]
    branches: list[str]

    def __repr__(self) -> str:
        return (f"Latent({self.layer} #{self.index}: dominant {self.dominant}, "
                f"firing rate {self.row.get('firing_rate', math.nan):.3g})")

    def _per_branch(self, prefix: str) -> dict[str, float]:
        return {b: float(self.row.get(f"{prefix}{b}", math.nan)) for b in self.branches}

    @property
    def ratios(self) -> dict[str, float]:
        """The paper's ratio ‖relu(v_b)‖ / ‖relu(v)‖ of the decoder direction v, per branch."""
        return self._per_branch("paper_ratio_")

    @property
    def full_ratios(self) -> dict[str, float]:
        """‖v_b‖ / ‖v‖ (signed entries too): the energy share's square root."""
        return self._per_branch("full_ratio_")

    @property
    def std_ratios(self) -> dict[str, float]:
        """The paper's ratio after dividing each channel by its activation std."""
        return self._per_branch("paper_ratio_std_")

    @property
    def p_values(self) -> dict[str, dict[str, float]]:
        """Per branch the Monte-Carlo p on the raw rule and on the scale rule."""
        return {b: {"raw": float(self.row[f"p_raw_{b}"]),
                    "scale": float(self.row[f"p_scale_{b}"])} for b in self.branches}

    @property
    def q_values(self) -> dict[str, dict[str, float]]:
        """BH-adjusted p per branch (across the layer's tested latents), both rules."""
        return {b: {"raw": float(self.row[f"q_raw_{b}"]),
                    "scale": float(self.row[f"q_scale_{b}"])} for b in self.branches}

    @property
    def dominant(self) -> str | None:
        """The branch the latent lives in by the primary (raw) rule, or None."""
        d = self.row.get("dominant")
        return d if d in self.branches else None

    @property
    def robust_dominant(self) -> str | None:
        """The dominant branch when the scale rule agrees, or None."""
        d = self.row.get("robust_dominant")
        return d if d in self.branches else None

    @property
    def alive(self) -> bool:
        return bool(self.row.get("alive"))

    @property
    def firing_rate(self) -> float:
        return float(self.row.get("firing_rate", math.nan))

    @property
    def top_image_ids(self) -> list[str]:
        """The analysis' top held-out images (best first; a mirror pair counts once)."""
        return list(self.row.get("top_images", []))

    @property
    def direction(self) -> Tensor:
        """The unit decoder direction in activation units [d_in]."""
        return self.run.sae(self.layer).decoder_directions()[self.index].detach().cpu()

    def store_indices(self, ids: Sequence[str]) -> dict[str, int]:
        """Image id -> position in the run's store, for the analysis' top images ``ids``."""
        where = {str(r.get("id", i)): i for i, r in enumerate(self.run.store().images)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise ProvenanceError(f"top images {missing[:3]} of {self.layer} #{self.index} are "
                                  "not in the run's store; re-run `branchlens analyze`")
        return where

    def top_images(self, n: int = 9, tile: int = 128) -> list[Image.Image]:
        """Receptive-field crops of the top images, the latent's map overlaid in red
        (:func:`branchlens.notebook.top_images`)."""
        from branchlens.notebook import top_images  # API here, code there

        return top_images(self, n, tile)

    def visualize(self, steps: int = 256, size: int = 224, seed: int = 0) -> Image.Image:
        """The feature picture, cached or rendered now (:func:`branchlens.notebook.visualize`)."""
        from branchlens.notebook import visualize  # API here, code there

        return visualize(self, steps, size, seed)
