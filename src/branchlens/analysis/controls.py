"""Controls that can fail: a global relabelling null, per-test calibration, power, data baseline.

The per-latent rules (``branches``) are calibrated on each latent's own values. These checks sit
one level up and answer what a reviewer asks of the *counts* the claims rest on:

- ``relabelling_null``: would a random channel→branch partition of the same widths give as
  many robust discoveries? The whole rule is re-run on every relabelling, so the null keeps the
  dependence between latents (many load on the same loud channels) that BH's count ignores.
- ``calibration``: rate of p < 0.05 and p < 0.001 on directions that are null for the rule,
  against the binomial bound a calibrated test respects.
- ``scale_power``: the scale rule's power on planted latents at the layer's own σ, at the BH
  cut-off the layer actually used, with the strata occupancy that can make it blind (a branch
  that fills whole std strata cannot lose its mass under within-stratum permutations). A
  branch with power < 0.5 is "not testable for scale", never "explained by channel scale".
- ``data_baseline``: directions drawn from the layer's activation covariance (and its
  principal directions) through both rules: is "SAE latents specialise" more than "the layer's
  covariance is branch-structured"?
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from branchlens.analysis.branches import (
    CONTROL_PERM_FACTOR,
    as_np,
    bh_threshold,
    branch_indicator,
    branch_labels,
    count_reaching,
    energy,
    label_bank,
    permutation_pvalues,
    scale_strata,
)
from branchlens.analysis.stats import bh_reject, calibration

MIN_POWER = 0.5  # below this the scale rule cannot tell "explained by scale" from "blind"
ALONE = 0.9  # a branch holding this share of a std stratum is alone in it


def _robust_p(p_raw: np.ndarray, p_scale: np.ndarray | None) -> np.ndarray:
    return p_raw if p_scale is None else np.fmax(p_raw, p_scale)


def relabelling_null(decoder, slices: dict[str, slice], *, std=None,
                     include: np.ndarray | None = None, replicates: int = 20,
                     n_perm: int = 200, alpha: float = 0.01, n_strata: int = 16, seed: int = 0,
                     device: str = "cpu") -> dict:
    """Robust (latent, branch) hits of the real branch partition vs ``replicates`` random ones.

    Statistic: pairs with p ≤ ``alpha`` under both rules (raw only without ``std``), p from
    ``n_perm`` channel permutations each — the same fixed procedure for the real labels and for
    every relabelling (channels reassigned to branches at random, widths and std strata kept),
    so the comparison is exact whatever the resolution. One-sided p = (1 + #{null ≥ obs}) /
    (1 + replicates): with 20 replicates the smallest is 0.048.
    """
    import torch

    raw = as_np(decoder)
    d = raw.shape[1]
    labels = branch_labels(slices, d)
    strata = scale_strata(std, n_strata) if std is not None else None
    names = list(slices)
    nb = len(names)
    rng = np.random.default_rng(seed)
    e = energy(raw)
    keep = e.sum(1) > 0
    if include is not None:
        keep &= np.asarray(include, bool)
    e = e[keep]
    a = torch.from_numpy(e / e.sum(1, keepdims=True)).float().to(device)

    def shares(bank: np.ndarray) -> torch.Tensor:  # [m, P·B] every latent's permuted shares
        return a @ branch_indicator(torch.from_numpy(bank).to(device), nb)

    def pvalues(obs: torch.Tensor, null: torch.Tensor) -> np.ndarray:
        ex = torch.zeros(a.shape[0], nb, dtype=torch.int64, device=device)
        count_reaching(null, obs, ex)
        return ((1.0 + ex) / (1.0 + n_perm)).cpu().numpy()

    # The raw rule's null draws of a partition L∘τ are L∘τ∘π for uniform π; with π = τ⁻¹∘σ they
    # are L∘σ: one bank of the real labels serves every partition exactly (each partition's
    # draws are still i.i.d. uniform), so its permuted shares are computed once and only the
    # observed shares change per partition.
    raw_null = shares(label_bank(labels, n_perm, rng))

    def hits(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        onehot = torch.nn.functional.one_hot(torch.from_numpy(lab).to(device), nb).float()
        obs = a @ onehot
        pr = pvalues(obs, raw_null)
        ps = (pvalues(obs, shares(label_bank(lab, n_perm, rng, strata)))
              if strata is not None else None)
        rob = _robust_p(pr, ps) <= alpha
        return rob.sum(0), (pr <= alpha).sum(0)

    obs, obs_raw = hits(labels)
    null = np.zeros((replicates, len(names)), np.int64)
    null_raw = np.zeros_like(null)
    for r in range(replicates):
        null[r], null_raw[r] = hits(labels[rng.permutation(d)])
    tot, tot_null = int(obs.sum()), null.sum(1)
    return {
        "statistic": f"(latent, branch) pairs with p ≤ {alpha} under both rules ({n_perm} "
                     "permutations each), real partition vs random ones of the same widths",
        "replicates": replicates, "n_perm": n_perm, "alpha": alpha,
        "observed": tot, "null": tot_null.tolist(), "null_mean": float(tot_null.mean()),
        "null_max": int(tot_null.max()) if replicates else None,
        "p_value": float((1 + np.sum(tot_null >= tot)) / (1 + replicates)),
        "observed_raw": int(obs_raw.sum()), "null_raw_mean": float(null_raw.sum(1).mean()),
        "per_branch": {b: {"observed": int(obs[i]), "null_mean": float(null[:, i].mean()),
                           "null_max": int(null[:, i].max()) if replicates else None,
                           "p_value": float((1 + np.sum(null[:, i] >= obs[i]))
                                            / (1 + replicates))}
                       for i, b in enumerate(names)},
    }


def strata_occupancy(std, slices: dict[str, slice], n_strata: int = 16) -> dict:
    """Per branch: channels per std stratum, the strata it holds alone (≥ 90 %), and the share
    of its channels in strata it shares — the only ones within-stratum permutations can move."""
    s = as_np(std)
    strata = scale_strata(s, n_strata)
    labels = branch_labels(slices, s.size)
    ids = np.unique(strata)
    counts = np.array([[int(np.sum((strata == k) & (labels == b))) for k in ids]
                       for b in range(len(slices))])
    size = counts.sum(0)
    alone = counts >= ALONE * size[None, :]
    out = {}
    for i, b in enumerate(slices):
        w = int(counts[i].sum())
        out[b] = {"per_stratum": counts[i].tolist(),
                  "strata_alone": int(alone[i].sum()),
                  "share_in_shared_strata": float(counts[i][~alone[i]].sum() / w) if w else None}
    return out


def _planted_pvalues(sets: dict[tuple[int, str], np.ndarray], labels: np.ndarray, n_perm: int,
                     rng: np.random.Generator, strata: np.ndarray | None, device: str,
                     block: int = 8192) -> dict[tuple[int, str], np.ndarray]:
    """Monte-Carlo p of branch i's share of ‖v‖² for each planted set ``(i, boost) → v`` under
    channel permutations (within ``strata``): the rule's statistic and null, one branch per
    set, every set sharing the same permutations (made once, block by block)."""
    import torch

    a, obs, ex = {}, {}, {}
    for (i, key), v in sets.items():
        e = v * v
        a[i, key] = torch.from_numpy(e / e.sum(1, keepdims=True)).float().to(device)
        obs[i, key] = a[i, key] @ torch.from_numpy((labels == i).astype(np.float32)).to(device)
        ex[i, key] = torch.zeros(v.shape[0], dtype=torch.int64, device=device)
    for s in range(0, n_perm, block):
        bank = label_bank(labels, min(block, n_perm - s), rng, strata)
        ind = {i: torch.from_numpy((bank == i).T.astype(np.float32)).to(device)
               for i in {i for i, _ in sets}}
        for (i, key) in sets:
            ex[i, key] += ((a[i, key] @ ind[i]) >= obs[i, key][:, None] - 1e-5).sum(1)
    return {k: ((1 + c) / (1 + n_perm)).cpu().numpy() for k, c in ex.items()}


def stratified_beta_pvalues(v: np.ndarray, labels: np.ndarray, branch: int,
                            strata: np.ndarray) -> np.ndarray:
    """Tail p of branch ``branch``'s share of ‖v‖² under permutations within ``strata`` from a
    Beta with the null's exact mean and variance (each stratum's part is a sum drawn without
    replacement from its values; strata are independent). Used only beyond Monte-Carlo
    resolution. A branch that fills its strata alone has variance 0: p = 1, as it must."""
    e = np.asarray(v, np.float64) ** 2
    a = e / e.sum(1, keepdims=True)
    mine = labels == branch
    obs = a[:, mine].sum(1)
    mean = np.zeros(a.shape[0])
    var = np.zeros(a.shape[0])
    for st in np.unique(strata):
        cols = strata == st
        n, c = int(cols.sum()), int((cols & mine).sum())
        if c == 0:
            continue
        x = a[:, cols]
        mean += c * x.mean(1)
        if c < n:
            var += c * (n - c) / (n * (n - 1)) * ((x - x.mean(1, keepdims=True)) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = mean * (1 - mean) / var - 1
        p = sps.beta.sf(obs, mean * k, (1 - mean) * k)
    return np.where(var > 0, np.nan_to_num(p, nan=1.0), np.where(obs > mean + 1e-12, 0.0, 1.0))


def scale_power(std, slices: dict[str, slice], *, cutoffs: np.ndarray, q: float, m: int,
                boosts: tuple[float, ...] = (1.5, 2.5), decide_at: float = 2.5,
                n_planted: int = 64, n_strata: int = 16, max_perm: int = 50_000,
                seed: int = 0, device: str = "cpu") -> dict:
    """Power of both rules on planted latents at this layer's σ, per branch.

    A planted latent is a σ-scaled Gaussian direction (σ_j·g_j, pure channel scale) whose
    channels in branch b are multiplied by a boost: specialisation beyond scale by
    construction. Power = share with p ≤ the layer's realised BH cut-off for b (``cutoffs``,
    0 → the cut-off for a first discovery, q/m), p from enough permutations to resolve the
    smallest cut-off (at most ``max_perm``). Where that cannot resolve a branch's cut-off (a
    branch without discoveries: q/m), a planted latent without a single exceedance is decided
    by the stratified null's moment-matched Beta (``tail: beta``). The branch is testable for
    scale when the power at ``decide_at`` reaches :data:`MIN_POWER`.
    """
    s = as_np(std)
    d = s.size
    strata = scale_strata(s, n_strata)
    labels = branch_labels(slices, d)
    rng = np.random.default_rng(seed)
    occ = strata_occupancy(s, slices, n_strata)
    boosts = tuple(sorted(set(boosts) | {decide_at}))
    cuts = [float(c) if c > 0 else q / max(m, 1) for c in np.asarray(cutoffs, np.float64)]
    n_perm = int(min(max_perm, max(1000, math.ceil(20 / min(cuts)))))
    sets = {}
    for i, b in enumerate(slices):
        g = rng.standard_normal((n_planted, d)) * s[None, :]
        for boost in boosts:
            v = g.copy()
            v[:, slices[b]] *= boost
            sets[i, str(boost)] = v
    p_scale = _planted_pvalues(sets, labels, n_perm, rng, strata, device)
    p_raw = _planted_pvalues(sets, labels, n_perm, rng, None, device)
    out: dict = {"boosts": list(boosts), "decide_at": decide_at, "n_perm": n_perm,
                 "planted_per_branch": n_planted, "min_power": MIN_POWER, "branches": {}}
    for i, b in enumerate(slices):
        resolved = bool(1 / (n_perm + 1) <= cuts[i])
        if not resolved:  # zero exceedances: beyond Monte-Carlo, the Beta tail decides
            for x in boosts:
                ps = p_scale[i, str(x)]
                none = ps <= 1 / (n_perm + 1)
                ps[none] = stratified_beta_pvalues(sets[i, str(x)][none], labels, i, strata)
        by_scale = {str(x): float(np.mean(p_scale[i, str(x)] <= cuts[i])) for x in boosts}
        by_raw = {str(x): float(np.mean(p_raw[i, str(x)] <= cuts[i])) for x in boosts}
        power = by_scale[str(decide_at)]
        out["branches"][b] = {
            "cutoff": cuts[i], "n_perm": n_perm, "resolved": resolved,
            "tail": "monte-carlo" if resolved else "beta",
            "power_scale": power, "power_scale_by_boost": by_scale,
            "power_raw_by_boost": by_raw, "testable_for_scale": power >= MIN_POWER, **occ[b]}
    return out


def covariance(x: np.ndarray) -> np.ndarray:
    """Sample covariance of rows ``x`` [N, d] (float64)."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(0, keepdims=True)
    return x.T @ x / max(x.shape[0] - 1, 1)


def data_directions(cov: np.ndarray, n: int, rng: np.random.Generator,
                    explained: float = 0.9, max_principal: int = 512) -> dict[str, np.ndarray]:
    """Directions the data itself offers: ``n`` draws from N(0, Σ), and Σ's principal
    directions up to ``explained`` of the variance (at most ``max_principal``)."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, np.float64))
    vals, vecs = np.clip(vals[::-1], 0, None), vecs[:, ::-1]
    root = vecs * np.sqrt(vals)[None, :]
    gauss = rng.standard_normal((n, vals.size)) @ root.T
    frac = np.cumsum(vals) / max(vals.sum(), 1e-300)
    k = int(min(max_principal, np.searchsorted(frac, explained) + 1, vals.size))
    return {"covariance_gaussian": gauss, "principal": vecs[:, :k].T.copy()}


def _robust_counts(p_raw: np.ndarray, p_scale: np.ndarray | None, q: float) -> np.ndarray:
    """[n, B] robust rejections: BH at q per branch under each rule, both."""
    rej, _ = bh_reject(p_raw, q)
    if p_scale is not None:
        rej &= bh_reject(p_scale, q)[0]
    return rej


def _two_proportions(k1: int, n1: int, k2: int, n2: int) -> dict:
    """Difference of two proportions, 95 % Wald interval, one-sided z-test p (1 > 2)."""
    if not n1 or not n2:
        return {"difference": None, "ci": None, "p_value": None}
    p1, p2 = k1 / n1, k2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    pool = (k1 + k2) / (n1 + n2)
    se0 = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    z = (p1 - p2) / se0 if se0 > 0 else 0.0
    return {"difference": p1 - p2, "ci": [p1 - p2 - 1.96 * se, p1 - p2 + 1.96 * se],
            "p_value": float(sps.norm.sf(z))}


def data_baseline(p_raw: np.ndarray, p_scale: np.ndarray | None, tested: np.ndarray,
                  cov: np.ndarray, slices: dict[str, slice], *, std=None, q: float = 0.05,
                  n: int = 2048, n_perm: int = 1000, max_perm: int | None = None,
                  n_strata: int = 16, seed: int = 0, device: str = "cpu") -> dict:
    """SAE latents vs directions drawn from the data, through the same two rules.

    Like for like: BH at q within a random ``n`` of the SAE's tested latents (their p-values
    from the main test) and within each family of data directions; the share of directions
    with a robust branch, per branch and any, SAE minus data with a 95 % interval and a
    one-sided p. Also calibration of both rules on the Gaussian draws (a reference: these are
    not null if Σ is branch-structured — which is the point of the baseline).
    """
    rng = np.random.default_rng(seed)
    names = list(slices)
    idx = np.flatnonzero(np.asarray(tested, bool))
    if idx.size > n:
        idx = np.sort(rng.choice(idx, n, replace=False))
    sae_rob = _robust_counts(p_raw[idx], None if p_scale is None else p_scale[idx], q)
    strata = scale_strata(std, n_strata) if std is not None else None
    out: dict = {"q": q, "sae": {"directions": int(idx.size),
                                 "robust_any": int(sae_rob.any(1).sum()),
                                 "per_branch": {b: int(sae_rob[:, i].sum())
                                                for i, b in enumerate(names)}},
                 "families": {}}
    for k, (name, v) in enumerate(data_directions(cov, int(idx.size) or n, rng).items()):
        cap = max_perm or max(n_perm, math.ceil(CONTROL_PERM_FACTOR * v.shape[0] / q))
        kw = dict(q=q, n_perm=n_perm, max_perm=cap, device=device)
        pr = permutation_pvalues(v, slices, seed=seed + 10 + 2 * k, **kw).p
        ps = (permutation_pvalues(v, slices, strata=strata, seed=seed + 11 + 2 * k, **kw).p
              if strata is not None else None)
        rob = _robust_counts(pr, ps, q)
        fam = {"directions": int(v.shape[0]), "robust_any": int(rob.any(1).sum()),
               "per_branch": {b: int(rob[:, i].sum()) for i, b in enumerate(names)},
               "raw_any": int(bh_reject(pr, q)[0].any(1).sum()),
               "sae_minus_data": _two_proportions(out["sae"]["robust_any"], int(idx.size),
                                                  int(rob.any(1).sum()), int(v.shape[0]))}
        if name == "covariance_gaussian":
            fam["calibration_raw"] = calibration(pr, names)
            if ps is not None:
                fam["calibration_scale"] = calibration(ps, names)
        out["families"][name] = fam
    return out


def realised_cutoffs(p: np.ndarray | None, q: float) -> np.ndarray | None:
    """The BH cut-off per branch that the layer's own test used (0: nothing rejected)."""
    return None if p is None else bh_threshold(p, q)
