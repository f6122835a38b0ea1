"""``analysis/latents.csv`` read column-wise into numpy arrays, one block per layer.

A 16× run on five layers has ~50k rows × ~70 columns; dict-per-row parsing is slow and heavy,
so only the columns the browser uses are converted (numbers to float arrays, NaN for empty).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from branchlens.analysis.table import LIST_COLUMNS, STR_COLUMNS

TEXT = tuple(sorted(STR_COLUMNS | set(LIST_COLUMNS)))  # the table's schema: kept as text here


@dataclass
class LayerColumns:
    """One layer's rows of latents.csv (index = latent id; missing latents stay NaN/'')."""

    layer: str
    n: int
    rows: int = 0  # rows actually present (a truncated table has fewer than n latents)
    num: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, list[str]] = field(default_factory=dict)

    def f(self, name: str) -> np.ndarray:
        """A numeric column (all NaN when the analysis did not write it)."""
        return self.num.get(name, np.full(self.n, np.nan))

    def s(self, name: str) -> list[str]:
        return self.text.get(name, [""] * self.n)


def _float(x: str) -> float:
    if x == "" or x is None:
        return np.nan
    if x in ("True", "False"):
        return float(x == "True")
    try:
        return float(x)
    except ValueError:
        return np.nan


def read_columns(path: Path, numeric: list[str] | None = None,
                 problems: list[str] | None = None) -> dict[str, LayerColumns]:
    """{layer: LayerColumns}; ``numeric`` limits which numeric columns are converted.

    Raises ValueError (one line) on a table without ``layer``/``latent`` columns. Rows of the
    wrong width (a damaged file) are left out and said in ``problems``."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        head = next(reader, None)
        if not head or "layer" not in head or "latent" not in head:
            raise ValueError(f"{path}: not a latents table (no layer/latent columns)")
        every = list(reader)
    rows = [r for r in every if len(r) == len(head)]
    if len(rows) < len(every) and problems is not None:
        problems.append(f"{path}: {len(every) - len(rows)} damaged line(s) left out; re-run "
                        "branchlens analyze")
    ci = {name: i for i, name in enumerate(head)}
    by_layer: dict[str, list[list[str]]] = {}
    for r in rows:
        by_layer.setdefault(r[ci["layer"]], []).append(r)
    want = [c for c in head if c not in TEXT and c != "latent"
            and (numeric is None or c in numeric)]
    out = {}
    for layer, rs in by_layer.items():
        ids = np.array([int(r[ci["latent"]]) if r[ci["latent"]].isdigit() else -1 for r in rs])
        keep = ids >= 0
        ids = ids[keep]
        rs = [r for r, k in zip(rs, keep, strict=True) if k]
        n = int(ids.max()) + 1 if ids.size else 0
        cols = LayerColumns(layer, n, rows=len(rs))
        for c in want:
            a = np.full(n, np.nan)
            a[ids] = [_float(r[ci[c]]) for r in rs]
            cols.num[c] = a
        for c in TEXT:
            if c in ci:
                t = [""] * n
                for i, r in zip(ids, rs, strict=True):
                    t[i] = r[ci[c]]
                cols.text[c] = t
        out[layer] = cols
    return out


NUMERIC = ("alive", "dead_in_training", "firing_rate", "mean_activation", "mean_when_active",
           "n_images_fired", "d_eff", "animal_fraction", "dog_fraction")
PER_BRANCH = ("paper_ratio", "p_raw", "q_raw", "p_scale", "q_scale", "enrichment",
              "attribution")


def numeric_columns(branches: list[str]) -> list[str]:
    """The latents.csv columns the browser converts."""
    return [*NUMERIC, *(f"{p}_{b}" for p in PER_BRANCH for b in branches)]
