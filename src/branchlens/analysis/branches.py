"""Per-latent branch specialization: the paper's ratio, null models, tests, dominant branch.

A decoder direction v (one latent, length d = channels of the layer) is split by the variant's
branch slices. Statistics are *shares of squared norm*: ``share_b = ‖v_b‖² / ‖v‖²`` (the full
ratio is its square root) and, for the paper's ratio, the same on ``relu(v)``.

Null models (the README's "Statistics" section says why each is needed):
- isotropic: v a uniformly random direction → ``share_b ~ Beta(w_b/2, (d−w_b)/2)``. Real decoders
  are heavy-tailed, so this is badly miscalibrated; reported as a reference only.
- channel permutation, raw decoder (the primary decision): keep v's values in activation units,
  assign them to channels at random. Answers "beyond channel identity".
- channel permutation within strata of equal activation std (the scale rule): answers "beyond
  what the channels' activation scale alone gives a branch". Robust = both reject.
- the positive-part (paper) statistic gets its own permutation null on ``relu(v)``.
Monte-Carlo p-values are refined adaptively until Benjamini–Hochberg can decide, so there is no
p-value floor; a moment-matched Beta (effective dimension from the kurtosis) is reported and
checked against Monte-Carlo in the tail. Relative (dictionary-normalised) scales are only
descriptive: they are zero-sum across latents and cannot decide specialization.

Enrichment is ``share_b / (w_b / d)`` (1 under the null), so a wide branch (1x1 in several
layers) does not collect latents by size alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

from branchlens.analysis.permtest import (  # noqa: F401  (the engine's names, re-exported)
    LATENT_CHUNK,
    PERM_CHUNK,
    REFINE_BANK,
    REFINE_ROWS,
    TIE_TOL,
    PermutationResult,
    as_np,
    bh_threshold,
    branch_indicator,
    branch_labels,
    count_exceedances,
    count_reaching,
    energy,
    label_bank,
    permutation_bank,
    permutation_pvalues,
    widths,
)
from branchlens.analysis.stats import bh_reject, calibration

NONE = -1  # dominant-branch code for "no significant branch"
CONTROL_PERM_FACTOR = 4  # refinement cap of control families: ⌈4·m/q⌉ (see null_controls)
PAPER_MAX_PERM = 32_000  # refinement cap of the paper-ratio (reference) test; see analyze_branches


def branch_shares(decoder, slices: dict[str, slice], positive: bool = False) -> np.ndarray:
    """Share of squared norm per branch, [n, B]; rows with zero norm are NaN.

    ``sqrt`` of it is the paper ratio ``‖relu(v_b)‖/‖relu(v)‖`` (positive=True) or the full ratio.
    """
    e = energy(decoder, positive)
    tot = e.sum(1, keepdims=True)
    per = np.stack([e[:, s].sum(1) for s in slices.values()], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, per / tot, np.nan)


def std_normalise(decoder, std) -> np.ndarray:
    """Decoder in units of each channel's activation std (``v_j / std_j``).

    Scale control: a branch whose channels are simply louder has larger decoder entries in
    activation units; dividing by the std removes that before comparing branches.
    """
    s = as_np(std)
    s = np.where(s > 0, s, np.median(s[s > 0]) if np.any(s > 0) else 1.0)
    return as_np(decoder) / s[None, :]


def isotropic_pvalues(shares: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Upper-tail p of each share under a random direction: Beta(w_b/2, (d−w_b)/2). Reference."""
    d = int(w.sum())
    return np.stack([sps.beta.sf(shares[:, b], w[b] / 2, (d - w[b]) / 2)
                     for b in range(len(w))], 1)


def effective_dimension(decoder, positive: bool = False) -> np.ndarray:
    """d_eff of the moment-matched Beta: ``2·((d−1)/(κ−1) − 1)``, κ = d·Σa_j²/(Σa_j)².

    κ is the (non-central) kurtosis of the values; Gaussian values give κ≈3 and d_eff≈d, as the
    isotropic Beta. Heavy tails (a few large entries) → large κ → small d_eff → wider null.
    """
    e = energy(decoder, positive)
    d = e.shape[1]
    tot = e.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = d * (e * e).sum(1) / (tot * tot)
        s = (d - 1) / np.maximum(kappa - 1, 1e-12) - 1
    return np.where(tot > 0, 2 * np.maximum(s, 1e-3), np.nan)


def beta_approx_pvalues(decoder, slices: dict[str, slice], positive: bool = False,
                        shares: np.ndarray | None = None) -> np.ndarray:
    """Permutation-null p-values from a Beta with the permutation distribution's mean/variance.

    Under a random channel assignment the branch share is a sum of w_b of the d values
    ``a_j = v_j²/‖v‖²`` drawn without replacement: mean w_b/d, variance
    ``w_b(d−w_b)(κ−1)/(d²(d−1))``. A Beta with these two moments has α+β = d_eff/2.
    """
    w = widths(slices)
    d = int(w.sum())
    if shares is None:
        shares = branch_shares(decoder, slices, positive)
    half = effective_dimension(decoder, positive)[:, None] / 2
    mu = (w / d)[None, :]
    return sps.beta.sf(shares, mu * half, (1 - mu) * half)


def scale_strata(std, n_strata: int = 16) -> np.ndarray:
    """Channel strata of near-equal activation scale (quantile bins of the std), int [d].

    Permuting values only *within* a stratum keeps every value in a channel of the same
    loudness: the null of "a branch's mass is what its channels' activation scale gives it".
    """
    s = as_np(std)
    d = s.size
    # Ties broken at random (fixed seed), not by channel index: with equal stds a stable sort
    # would make each stratum a run of adjacent channels, i.e. of one branch, and blind the rule.
    order = np.lexsort((np.random.default_rng(0).permutation(d), s))
    strata = np.empty(d, np.int64)
    strata[order] = np.arange(d) * min(n_strata, d) // d
    return strata



def enrichment(shares: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Share of squared norm over channel share (1 = what a branch of that width gets by size)."""
    return shares / (w / w.sum())[None, :]


def dominant_branch(reject: np.ndarray, enrich: np.ndarray) -> np.ndarray:
    """Significant branch with the largest enrichment, or NONE (−1)."""
    e = np.where(reject, np.nan_to_num(enrich, nan=-np.inf), -np.inf)
    dom = np.argmax(e, 1)
    return np.where(reject.any(1), dom, NONE)


def dictionary_normalise(decoder, include: np.ndarray | None = None) -> np.ndarray:
    """Decoder with every channel divided by its RMS over the (included) latents.

    Descriptive only, never a decision scale: it fixes each branch's total over the dictionary
    (Σ_latents Σ_{c∈b} u² = n·w_b), so a branch many latents use can never come out enriched
    and a branch the dictionary uses little is "enriched" for ordinary directions. It answers
    "more concentrated than the average latent", not "specialised".
    """
    v = as_np(decoder)
    ref = v if include is None else v[np.asarray(include, bool)]
    rms = np.sqrt(np.mean(ref * ref, axis=0)) if ref.size else np.ones(v.shape[1])
    pos = rms[rms > 0]
    rms = np.where(rms > 0, rms, np.median(pos) if pos.size else 1.0)
    return v / rms[None, :]


@dataclass
class BranchTest:
    """All per-latent branch statistics of one layer; arrays are [n] or [n, B].

    Two decision rules, both channel-permutation tests with BH at ``q`` per branch over the
    tested latents:
    - ``raw``: the decoder in activation units (the paper's definition) against a permutation
      of its values over all channels — "does the latent write to branch b beyond channel
      identity?" This is the primary decision (``reject``, ``dominant``).
    - ``scale``: the same values permuted only within strata of equal activation std — "beyond
      what the channels' activation scale alone gives the branch?" (``None`` without std).
    A latent is *robustly* specialised in b when both reject; raw-only is "explained by
    channel scale". Dead/never-firing latents are not tested (``tested`` False, NaN p).
    """

    branches: list[str]
    widths: np.ndarray
    q: float
    tested: np.ndarray  # [n] bool
    paper_ratio: np.ndarray  # raw decoder, ‖relu(v_b)‖/‖relu(v)‖ (the paper's definition)
    full_ratio: np.ndarray
    paper_ratio_std: np.ndarray | None  # on the std-normalised decoder (descriptive)
    full_ratio_std: np.ndarray | None
    enrichment: np.ndarray  # raw share of ‖v‖² over channel share (1 = by width alone)
    enrichment_dict: np.ndarray  # the same on the dictionary-normalised decoder (descriptive)
    p_raw: np.ndarray
    q_raw: np.ndarray
    reject: np.ndarray  # raw rule
    p_scale: np.ndarray | None
    q_scale: np.ndarray | None
    reject_scale: np.ndarray | None
    p_paper: np.ndarray  # positive-part statistic, raw decoder, its own permutation null
    reject_paper: np.ndarray
    p_beta: np.ndarray  # moment-matched Beta approximation of p_raw (checked in the tail)
    p_iso: np.ndarray  # isotropic reference (raw decoder); never used for decisions
    d_eff: np.ndarray
    n_perm: np.ndarray  # permutations spent per latent, raw rule
    dominant: np.ndarray  # raw rule: significant branch with the largest enrichment, or NONE

    @property
    def n(self) -> int:
        return int(self.paper_ratio.shape[0])

    @property
    def robust(self) -> np.ndarray:
        """[n, B] significant under both rules (raw only when there is no scale rule)."""
        return self.reject if self.reject_scale is None else self.reject & self.reject_scale

    @property
    def robust_dominant(self) -> np.ndarray:
        """Among the branches significant under *both* rules, the one with the largest
        enrichment, else NONE: the scale-controlled label every claim and picture uses.

        (Not "the raw dominant branch if it is also robust": a latent robust in a quiet 5x5
        branch whose raw argmax is the loud 1x1 would then be "none", a bias against exactly
        the quiet branches.)"""
        return dominant_branch(self.robust, self.enrichment)

    def dominant_names(self, robust: bool = False) -> list[str]:
        dom = self.robust_dominant if robust else self.dominant
        return ["none" if i == NONE else self.branches[i] for i in dom]


def analyze_branches(decoder, slices: dict[str, slice], *, std=None,
                     include: np.ndarray | None = None, q: float = 0.05, n_perm: int = 1000,
                     max_perm: int | None = None, n_strata: int = 16, seed: int = 0,
                     paper_max_perm: int | None = PAPER_MAX_PERM,
                     device: str = "cpu") -> BranchTest:
    """Every branch statistic of one layer's decoder [n_latents, d] (see :class:`BranchTest`).

    The paper-ratio test (positive part, a reference column: no decision uses it) refines its
    Monte-Carlo p-values only up to ``paper_max_perm`` permutations: resolving BH cut-offs of
    a handful of discoveries costs it 15× the rest of the branch tests (mixed4c 16×: 45 s vs
    3 s at 32 000, the same discoveries but 4 of 1346). ``None``: as far as the other rules.

    ``std`` [d] is each channel's activation std (store statistics): it defines the scale
    rule's strata and the std-normalised ratios. ``include`` [n] marks the latents to test
    (alive ones); the others get NaN statistics and are not in BH's m.
    Latents are not independent (they share images and directions); BH's guarantee assumes
    independence or positive dependence, so read counts as approximate.
    """
    raw = as_np(decoder)
    n = raw.shape[0]
    tested = np.ones(n, bool) if include is None else np.asarray(include, bool).copy()
    tested &= np.square(raw).sum(1) > 0
    w = widths(slices)
    kw = dict(include=tested, q=q, n_perm=n_perm, max_perm=max_perm, device=device)
    perm = permutation_pvalues(raw, slices, seed=seed, **kw)
    cap = max_perm if paper_max_perm is None else min(max_perm or paper_max_perm,
                                                         paper_max_perm)
    perm_pos = permutation_pvalues(raw, slices, positive=True, seed=seed + 1,
                                   **(kw | {"max_perm": None if cap is None
                                            else max(cap, n_perm)}))
    reject, qval = bh_reject(perm.p, q)
    reject_pos, _ = bh_reject(perm_pos.p, q)
    p_scale = q_scale = reject_scale = None
    dstd = None
    if std is not None:
        sc = permutation_pvalues(raw, slices, strata=scale_strata(std, n_strata), seed=seed + 2,
                                 **kw)
        p_scale = sc.p
        reject_scale, q_scale = bh_reject(p_scale, q)
        dstd = std_normalise(raw, std)

    def masked(x: np.ndarray) -> np.ndarray:
        return np.where(tested[:, None], x, np.nan)

    share_raw = branch_shares(raw, slices)
    enr = masked(enrichment(share_raw, w))
    return BranchTest(
        branches=list(slices), widths=w, q=q, tested=tested,
        paper_ratio=np.sqrt(branch_shares(raw, slices, True)), full_ratio=np.sqrt(share_raw),
        paper_ratio_std=np.sqrt(branch_shares(dstd, slices, True)) if dstd is not None else None,
        full_ratio_std=np.sqrt(branch_shares(dstd, slices)) if dstd is not None else None,
        enrichment=enr,
        enrichment_dict=masked(enrichment(branch_shares(dictionary_normalise(raw, tested),
                                                        slices), w)),
        p_raw=perm.p, q_raw=qval, reject=reject,
        p_scale=p_scale, q_scale=q_scale, reject_scale=reject_scale,
        p_paper=perm_pos.p, reject_paper=reject_pos,
        p_beta=masked(beta_approx_pvalues(raw, slices, shares=share_raw)),
        p_iso=masked(isotropic_pvalues(share_raw, w)),
        d_eff=np.where(tested, effective_dimension(raw), np.nan), n_perm=perm.n_perm,
        dominant=dominant_branch(reject, enr))


def null_controls(decoder, slices: dict[str, slice], *, std=None,
                  include: np.ndarray | None = None, q: float = 0.05, n_perm: int = 1000,
                  max_perm: int | None = None, n_strata: int = 16,
                  max_latents: int | None = 2048, seed: int = 0,
                  device: str = "cpu") -> dict[str, dict]:
    """Discoveries of each decision rule on directions drawn from its own null (≤ q·m expected).

    Drawn from (at most ``max_latents``, a random subset of) the included latents: under a
    global null BH's cut-off is q/m, and resolving it costs ~4m/q permutations, so a family of
    a few thousand null directions checks the rule at a fraction of the cost.

    - ``raw_rule_null_draws``: every latent's values put into channels by an independent random
      permutation (exactly the raw rule's null), tested with the raw rule.
    - ``raw_rule_same_permutation``: one channel permutation for all latents (keeps everything
      but the branch structure), raw rule.
    - ``scale_rule_null_draws``: independent permutations within the std strata, scale rule.
    - ``scale_rule_scaled_gaussian``: random directions with each channel's activation std
      (σ_j·g_j), scale rule: what channel scale alone produces must not pass it.
    - ``raw_rule_scaled_gaussian`` (a reference, not a control): the same directions through
      the raw rule: how much pure channel scale the raw rule calls specialised.
    """
    raw = as_np(decoder)
    keep = np.ones(raw.shape[0], bool) if include is None else np.asarray(include, bool)
    raw = raw[keep]
    rng = np.random.default_rng(seed)
    if max_latents is not None and raw.shape[0] > max_latents:
        raw = raw[np.sort(rng.choice(raw.shape[0], max_latents, replace=False))]
    n, d = raw.shape
    # 4·m/q permutations resolve p down to q/(4m), below BH's first cut-off q/m, so a control can
    # still reject (fail); the main test's 20·m/q would spend most of the analysis here
    cap = max_perm or max(n_perm, int(np.ceil(CONTROL_PERM_FACTOR * max(n, 1) / q)))
    kw = dict(q=q, n_perm=n_perm, max_perm=cap, device=device)
    def run(name: str, v: np.ndarray, strata=None, k: int = 0, independent: bool = True) -> None:
        res = permutation_pvalues(v, slices, strata=strata, seed=seed + 10 + k, **kw)
        rej, _ = bh_reject(res.p, q)
        out[name] = {"tested": n, "bound_q_m": q * n, "significant": int(rej.any(1).sum()),
                     "per_branch": {b: int(rej[:, i].sum()) for i, b in enumerate(slices)},
                     "permutations_max": int(res.n_perm.max()) if n else 0}
        if independent:  # one p per independent direction: a binomial bound applies
            out[name]["calibration"] = calibration(res.p, list(slices))

    out: dict[str, dict] = {}
    if n == 0:
        return out
    run("raw_rule_null_draws", rng.permuted(raw, axis=1), k=0)
    run("raw_rule_same_permutation", raw[:, rng.permutation(d)], k=1, independent=False)
    if std is not None:
        strata = scale_strata(std, n_strata)
        drawn = np.empty_like(raw)
        for st in np.unique(strata):
            cols = np.flatnonzero(strata == st)
            drawn[:, cols] = rng.permuted(raw[:, cols], axis=1)
        run("scale_rule_null_draws", drawn, strata, k=2)
        s = as_np(std)
        gauss = rng.standard_normal((n, d)) * s[None, :]
        run("scale_rule_scaled_gaussian", gauss, strata, k=3)
        run("raw_rule_scaled_gaussian", gauss, k=4)
        out["raw_rule_scaled_gaussian"]["reference_only"] = True
    return out


def ratio_null(decoder, slices: dict[str, slice], *, positive: bool = True,
               include: np.ndarray | None = None, n_rep: int = 200, bank: int = 512,
               seed: int = 0, thresholds: tuple[float, ...] = (0.5, 0.9),
               qs: tuple[float, float] = (0.05, 0.95), device: str = "cpu") -> dict:
    """The paper's sorted-ratio curve against its channel-permutation null, per branch.

    Each of ``n_rep`` replicates draws, for every latent independently, one of ``bank`` random
    channel permutations and recomputes the ratio ``‖relu(v_b)‖/‖relu(v)‖`` (``positive``) or
    ``‖v_b‖/‖v‖``. Returns observed and null medians and counts above each threshold
    (null mean, 5–95 % interval, one-sided p = share of replicates ≥ observed) and the
    5–95 % band of the sorted curve, [2, B, n_tested].
    """
    e = energy(decoder, positive)
    keep = e.sum(1) > 0
    if include is not None:
        keep &= np.asarray(include, bool)
    e = e[keep]
    n, d = e.shape
    nb = len(slices)
    names = list(slices)
    labels = branch_labels(slices, d)
    obs = np.sqrt(branch_shares(np.sqrt(e), slices))  # e ≥ 0: shares of e itself
    rng = np.random.default_rng(seed)
    a = torch.from_numpy(e / e.sum(1, keepdims=True)).float().to(device)
    lb = torch.from_numpy(label_bank(labels, bank, rng)).to(device)
    shares = (a @ branch_indicator(lb, nb)).view(n, bank, nb).cpu().numpy()  # [n, bank, B]
    curves = np.empty((n_rep, nb, n), np.float32)
    med = np.empty((n_rep, nb))
    above = {t: np.empty((n_rep, nb)) for t in thresholds}
    rows = np.arange(n)
    for r in range(n_rep):
        ratio = np.sqrt(np.clip(shares[rows, rng.integers(0, bank, n)], 0, 1))  # [n, B]
        curves[r] = np.sort(ratio, axis=0).T
        med[r] = np.median(ratio, axis=0)
        for t in thresholds:
            above[t][r] = (ratio > t).sum(0)
    out: dict = {"n_latents": int(n), "n_replicates": n_rep, "positive": positive,
                 "band": np.quantile(curves, qs, axis=0) if n else np.zeros((2, nb, 0)),
                 "branches": {}}
    for i, b in enumerate(names):
        row = {"median": float(np.median(obs[:, i])) if n else None,
               "null_median_mean": float(med[:, i].mean()),
               "null_median_q05": float(np.quantile(med[:, i], 0.05)),
               "null_median_q95": float(np.quantile(med[:, i], 0.95)),
               "p_median": float((1 + np.sum(med[:, i] >= np.median(obs[:, i]))) / (1 + n_rep))
               if n else None,
               "isotropic_ratio": float(np.sqrt((labels == i).sum() / d))}
        for t in thresholds:
            k = int(np.sum(obs[:, i] > t))
            row |= {f"count_gt_{t}": k, f"null_count_gt_{t}_mean": float(above[t][:, i].mean()),
                    f"null_count_gt_{t}_q05": float(np.quantile(above[t][:, i], 0.05)),
                    f"null_count_gt_{t}_q95": float(np.quantile(above[t][:, i], 0.95)),
                    f"p_count_gt_{t}": float((1 + np.sum(above[t][:, i] >= k)) / (1 + n_rep))}
        out["branches"][b] = row
    return out


def _count(mask: np.ndarray) -> int:
    return int(np.asarray(mask).sum())


def layer_table(bt: BranchTest) -> list[dict]:
    """One row per branch: discoveries per rule, robust/scale-explained counts, dominance."""
    d = int(bt.widths.sum())
    m = _count(bt.tested)
    rows = []
    naive = np.nanargmax(np.nan_to_num(bt.paper_ratio, nan=-1.0), 1)
    robust, rdom = bt.robust, bt.robust_dominant
    for i, b in enumerate(bt.branches):
        sig = bt.reject[:, i]
        dom = bt.dominant == i
        pr = bt.paper_ratio[bt.tested, i]
        row = {
            "branch": b, "width": int(bt.widths[i]), "channel_share": bt.widths[i] / d,
            "latents": bt.n, "tested": m,
            "significant": _count(sig),  # raw rule, the primary decision
            # BH bounds E[false / discoveries] by q, so q·R bounds the expected false ones.
            "expected_false_positives": bt.q * _count(sig),
            "significant_scale": (_count(bt.reject_scale[:, i])
                                  if bt.reject_scale is not None else None),
            "robust": _count(robust[:, i]),
            "explained_by_scale": (_count(sig & ~bt.reject_scale[:, i])
                                   if bt.reject_scale is not None else None),
            "significant_paper_ratio": _count(bt.reject_paper[:, i]),
            "significant_isotropic_reference": _count(bh_reject(bt.p_iso, bt.q)[0][:, i]),
            "dominant": _count(dom), "robust_dominant": _count(rdom == i),
            "dominant_fraction": _count(dom) / max(m, 1),
            "dominant_enrichment_vs_channel_share": _count(dom) / max(m, 1) / (bt.widths[i] / d),
            "naive_argmax_paper_ratio": _count((naive == i) & bt.tested),
            "mean_enrichment": float(np.nanmean(bt.enrichment[:, i])) if m else None,
            "mean_enrichment_dict": float(np.nanmean(bt.enrichment_dict[:, i])) if m else None,
            "median_enrichment_of_dominant": (float(np.nanmedian(bt.enrichment[dom, i]))
                                              if dom.any() else None),
            "median_paper_ratio": float(np.median(pr)) if m else None,
            "paper_ratio_gt_0.5": _count(pr > 0.5), "paper_ratio_gt_0.9": _count(pr > 0.9),
            "isotropic_null_ratio": float(np.sqrt(bt.widths[i] / d)),
        }
        rows.append(row)
    return rows
