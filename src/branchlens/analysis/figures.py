"""Figures (matplotlib Agg, PNG + SVG): sorted-ratio curves with the null band, embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from branchlens.analysis.branches import NONE
from branchlens.artifacts import atomic_path

BRANCH_COLORS = {"1x1": "#1f77b4", "3x3": "#2ca02c", "5x5": "#d62728", "pool": "#9467bd",
                 "none": "#c7c7c7"}


def _save(fig, stem: Path) -> list[str]:
    out = []
    for ext in ("png", "svg"):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
        out.append(str(path))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def sorted_ratio_curves(paper_ratio: np.ndarray, band: np.ndarray, branches: list[str],
                        widths: np.ndarray, stem: Path, title: str,
                        groups: dict[str, np.ndarray] | None = None) -> list[str]:
    """The paper's figure per branch: ratios sorted ascending, with the 5–95 % band of the
    channel-permutation null and highlighted latent groups (boolean masks) marked on the curve.
    """
    plt = _plt()
    nb = len(branches)
    fig, axes = plt.subplots(1, nb, figsize=(4 * nb, 3.4), sharey=True, squeeze=False)
    d = int(widths.sum())
    for b, ax in enumerate(axes[0]):
        r = np.nan_to_num(paper_ratio[:, b], nan=0.0)
        order = np.argsort(r, kind="stable")
        x = np.arange(r.size)
        ax.fill_between(x, band[0, b], band[1, b], color="0.8", label="null 5–95 %")
        ax.plot(x, r[order], color=BRANCH_COLORS.get(branches[b], "k"), lw=1.2,
                label="latents")
        ax.axhline(np.sqrt(widths[b] / d), color="0.4", ls=":", lw=0.8,
                   label="√(w_b/d)")
        for gi, (name, mask) in enumerate((groups or {}).items()):
            pos = np.flatnonzero(np.asarray(mask)[order])
            ax.scatter(pos, r[order][pos], s=6, zorder=3, color=f"C{gi + 4}",
                       label=f"{name} ({pos.size})")
        ax.set_title(f"{branches[b]} (w={widths[b]})")
        ax.set_xlabel("latents, sorted")
        if b == 0:
            ax.set_ylabel("‖relu(v_b)‖ / ‖relu(v)‖")
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(title, fontsize=10)
    out = _save(fig, stem)
    plt.close(fig)
    return out


def embedding_plot(coords: np.ndarray, dominant: np.ndarray, branches: list[str], stem: Path,
                   title: str) -> list[str]:
    """Latent embedding coloured by dominant branch (grey: none)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    none = dominant == NONE
    ax.scatter(coords[none, 0], coords[none, 1], s=2, color=BRANCH_COLORS["none"],
               label=f"none ({int(none.sum())})", rasterized=True)
    for i, b in enumerate(branches):
        m = dominant == i
        ax.scatter(coords[m, 0], coords[m, 1], s=4, color=BRANCH_COLORS.get(b, f"C{i}"),
                   label=f"{b} ({int(m.sum())})", rasterized=True)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=3)
    out = _save(fig, stem)
    plt.close(fig)
    return out
