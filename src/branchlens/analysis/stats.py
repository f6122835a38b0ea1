"""Generic statistics used by the branch analysis: multiple testing, agreement, rank tests.

Kept free of any SAE/store types so each function can be checked on planted arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps


def bh_reject(p: np.ndarray, q: float = 0.05, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg step-up along ``axis``: (reject mask, adjusted p-values).

    The adjustment is scipy's ``false_discovery_control``; the loop only exists because NaN
    p-values mean "not tested": they are never rejected and do not count in m.
    """
    p = np.moveaxis(np.asarray(p, dtype=np.float64), axis, 0)
    flat = p.reshape(p.shape[0], -1)
    adj = np.full_like(flat, np.nan)
    for c in range(flat.shape[1]):
        ok = ~np.isnan(flat[:, c])
        if ok.any():
            adj[ok, c] = sps.false_discovery_control(flat[ok, c], method="bh")
    rej = np.nan_to_num(adj, nan=np.inf) <= q
    return (np.moveaxis(rej.reshape(p.shape), 0, axis),
            np.moveaxis(adj.reshape(p.shape), 0, axis))


def cohen_kappa(table: np.ndarray) -> float:
    """Cohen's kappa of a square contingency table (rows: rater A, columns: rater B)."""
    t = np.asarray(table, dtype=np.float64)
    n = t.sum()
    if n == 0:
        return float("nan")
    po = np.trace(t) / n
    pe = float((t.sum(1) / n) @ (t.sum(0) / n))
    return float((po - pe) / (1 - pe)) if pe < 1 else float("nan")


def contingency(a: np.ndarray, b: np.ndarray, n_labels: int) -> np.ndarray:
    """Square count table of integer labels ``a`` (rows) against ``b`` (columns)."""
    t = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(t, (np.asarray(a), np.asarray(b)), 1)
    return t


def agreement_permutation_test(a: np.ndarray, b: np.ndarray, n_perm: int = 10000,
                               seed: int = 0) -> dict:
    """Agreement rate of paired labels vs a null that shuffles the pairing.

    Shuffling which ``b`` goes with which ``a`` keeps both label distributions (and any
    dependence among latents within a layer) and destroys only the matching.
    """
    a, b = np.asarray(a), np.asarray(b)
    n = a.size
    if n == 0:
        return {"n_pairs": 0, "agreement": float("nan"), "null_mean": float("nan"),
                "null_q05": float("nan"), "null_q95": float("nan"), "p_value": float("nan")}
    obs = float(np.mean(a == b))
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for s in range(0, n_perm, 256):
        e = min(n_perm, s + 256)
        idx = rng.permuted(np.broadcast_to(np.arange(n), (e - s, n)), axis=1)
        null[s:e] = (b[idx] == a[None, :]).mean(1)
    p = (1 + np.sum(null >= obs - 1e-12)) / (n_perm + 1)
    return {"n_pairs": int(n), "agreement": obs, "null_mean": float(null.mean()),
            "null_q05": float(np.quantile(null, 0.05)),
            "null_q95": float(np.quantile(null, 0.95)), "p_value": float(p)}


def mann_whitney(x: np.ndarray, y: np.ndarray) -> dict:
    """Two-sided Mann–Whitney U of ``x`` vs ``y`` with the rank-biserial effect size.

    ``effect`` = P(X > Y) − P(X < Y) in [−1, 1]; positive means ``x`` tends to be larger.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    out = {"n_x": int(x.size), "n_y": int(y.size),
           "mean_x": float(x.mean()) if x.size else float("nan"),
           "mean_y": float(y.mean()) if y.size else float("nan")}
    if x.size == 0 or y.size == 0:
        return {**out, "U": float("nan"), "effect": float("nan"), "p_value": float("nan")}
    res = sps.mannwhitneyu(x, y, alternative="two-sided")
    u = float(res.statistic)
    return {**out, "U": u, "effect": 2 * u / (x.size * y.size) - 1,
            "p_value": float(res.pvalue)}


def calibration(p: np.ndarray, branches: list[str],
                levels: tuple[float, ...] = (0.05, 0.001)) -> dict:
    """Rate of p < level per branch and overall, with the binomial upper bound of a calibrated
    test (its rate may be lower: conservative is allowed, excess is not). The bound is at 1 %
    over all the cells together (Bonferroni), so a calibrated rule fails it 1 time in 100."""
    p = np.asarray(p, np.float64)
    conf = 1 - 0.01 / (len(levels) * (len(branches) + 1))
    out: dict = {"confidence_per_cell": conf}
    for lev in levels:
        cells = {}
        for i, b in enumerate([*branches, "all"]):
            col = p[:, i] if b != "all" else p.ravel()
            col = col[np.isfinite(col)]
            n = int(col.size)
            hi = float(sps.binom.ppf(conf, n, lev) / n) if n else None
            rate = float(np.mean(col < lev)) if n else None
            cells[b] = {"n": n, "rate": rate, "upper": hi,
                        "ok": None if n == 0 else bool(rate <= hi)}
        out[str(lev)] = cells
    out["ok"] = all(c["ok"] is not False for lev in levels for c in out[str(lev)].values())
    return out
