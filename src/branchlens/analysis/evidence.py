"""The latents each claim rests on, chosen from the analysis' own decisions.

A verdict is only checkable by eye if the pictures shown are the latents it was decided from,
not a random sample: for every (layer, branch) cell with robust discoveries, the cell's most
significant robust latents; for the cross-layer claim, the strongest matched pairs. The
visualize stage renders these (full and branch-restricted), the report shows them under the
claims. Pure functions of the latent table and the summary.
"""

from __future__ import annotations

import math
from typing import Any

from branchlens.analysis.table import NO_BRANCH


def _q(row: dict[str, Any], branch: str) -> float:
    """The larger of the two rules' q-values: robust means significant under both."""
    vals = [row.get(f"q_raw_{branch}", math.nan), row.get(f"q_scale_{branch}", math.nan)]
    vals = [float(v) for v in vals if v == v]
    return max(vals) if vals else math.inf


def cell_latents(rows: list[dict[str, Any]], per_cell: int) -> dict[str, list[int]]:
    """branch -> up to ``per_cell`` latents robustly dominant there, most significant first
    (ties: the larger paper ratio of that branch). Cells without discoveries are left out."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        b = r.get("robust_dominant") or NO_BRANCH
        if b != NO_BRANCH and r.get("alive", True):
            cells.setdefault(b, []).append(r)
    return {b: [int(r["latent"]) for r in sorted(
        rs, key=lambda r: (_q(r, b), -float(r.get(f"paper_ratio_{b}", 0) or 0)))[:per_cell]]
        for b, rs in cells.items()}


def matched_pairs(summary: dict[str, Any] | None, n: int) -> list[dict[str, Any]]:
    """The ``n`` best-correlated matched pairs of every adjacent layer pair of the analysis:
    ``{"up", "down", "a", "b", "corr"}``."""
    out = []
    for c in (summary or {}).get("cross_layer") or []:
        layers = c.get("layers") or []
        if len(layers) != 2:
            continue
        best = sorted(c.get("matches") or [], key=lambda m: -float(m[2]))[:n]
        out += [{"up": layers[0], "down": layers[1], "a": int(a), "b": int(b),
                 "corr": float(r)} for a, b, r in best]
    return out


def own_latent(pair: dict[str, Any], layer: str) -> int:
    """The latent of a matched pair that lives in ``layer``."""
    return pair["a"] if pair["up"] == layer else pair["b"]


def evidence_plan(tables: dict[str, list[dict[str, Any]]], summary: dict[str, Any] | None,
                  per_cell: int, n_pairs: int) -> dict[str, dict[str, Any]]:
    """layer -> {"cells": {branch: [latents]}, "pairs": [...], "latents": sorted union}:
    what to render for each layer so that every claim has its pictures."""
    pairs = matched_pairs(summary, n_pairs)
    plan = {}
    for layer, rows in tables.items():
        cells = cell_latents(rows, per_cell)
        mine = [p for p in pairs if layer in (p["up"], p["down"])]
        lats = {j for js in cells.values() for j in js}
        lats |= {own_latent(p, layer) for p in mine}
        plan[layer] = {"cells": cells, "pairs": mine, "latents": sorted(lats)}
    return plan


def capped(plan: dict[str, Any], layer: str, per_cell: int, cap: int) -> dict[str, Any]:
    """One layer's plan cut to ``cap`` latents so that every claim keeps pictures: the best
    latent of every cell first, then the matched pairs' latents, then the cells' further
    latents round-robin (a cap must not spend itself on one loud branch)."""
    cells = plan["cells"]
    tiers = [[j for j in tier if j is not None] for tier in zip(
        *[v + [None] * (per_cell - len(v)) for v in cells.values()], strict=True)] \
        if cells else []
    mine = [own_latent(p, layer) for p in plan["pairs"]]
    order = (tiers[0] if tiers else []) + mine + [j for t in tiers[1:] for j in t]
    keep = list(dict.fromkeys(order))[:cap]
    kept = {b: [j for j in v if j in keep] for b, v in cells.items()}
    return {"cells": {b: v for b, v in kept.items() if v},
            "pairs": [p for p in plan["pairs"] if own_latent(p, layer) in keep],
            "latents": sorted(keep)}
