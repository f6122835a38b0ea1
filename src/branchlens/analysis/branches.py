"""Per-latent branch specialization: the paper's ratio, null models, tests, dominant branch.

A decoder direction v (one latent, length d = channels of the layer) is split by the variant's
branch slices. Statistics are *shares of squared norm*: ``share_b = ‖v_b‖² / ‖v‖²`` (the full
ratio is its square root) and, for the paper's ratio, the same on ``relu(v)``.

Null models (see docs/reference statistics.md):
- isotropic: v a uniformly random direction → ``share_b ~ Beta(w_b/2, (d−w_b)/2)``. Real decoders
  are heavy-tailed, so this is badly miscalibrated; reported as a reference only.
- channel permutation (the decision rule): keep v's values, assign them to channels at random.
  Applied to the dictionary-normalised decoder (each channel divided by its RMS over latents),
  because channel-level scale (loud or quiet channels in every latent) breaks exchangeability;
  raw and activation-std-normalised decoders are reported as controls.
  Exact Monte-Carlo over all latents × B permutations at once, plus a moment-matched Beta whose
  effective dimension comes from the values' kurtosis (fast, checked against Monte-Carlo).
  The positive-part (paper) statistic gets its own permutation null on ``relu(v)``.

Enrichment is ``share_b / (w_b / d)`` (1 under both nulls), so a wide branch (1x1 in several
layers) does not collect latents by size alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as sps

from branchlens.analysis.stats import bh_reject

NONE = -1  # dominant-branch code for "no significant branch"


def branch_labels(slices: dict[str, slice], d: int) -> np.ndarray:
    """Branch index of every channel (int [d]); every channel must belong to exactly one."""
    lab = np.full(d, -1, dtype=np.int64)
    for i, s in enumerate(slices.values()):
        if np.any(lab[s] != -1):
            raise ValueError("branch slices overlap")
        lab[s] = i
    if np.any(lab < 0):
        raise ValueError(f"branch slices do not cover all {d} channels")
    return lab


def widths(slices: dict[str, slice]) -> np.ndarray:
    return np.array([s.stop - s.start for s in slices.values()], dtype=np.int64)


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def energy(decoder, positive: bool = False) -> np.ndarray:
    """Per-channel squared values ``v_j²`` (or ``relu(v_j)²``), float64 [n, d]."""
    v = _as_np(decoder)
    if positive:
        v = np.maximum(v, 0.0)
    return v * v


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
    s = _as_np(std)
    s = np.where(s > 0, s, np.median(s[s > 0]) if np.any(s > 0) else 1.0)
    return _as_np(decoder) / s[None, :]


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


@dataclass
class PermutationResult:
    """Monte-Carlo channel-permutation test: p = (1 + #{T_perm ≥ T_obs}) / (1 + B_i)."""

    p: np.ndarray  # [n, B]
    exceed: np.ndarray  # [n, B] counts
    n_perm: np.ndarray  # [n] permutations used per latent (refined latents get more)


def _indicator(labels: torch.Tensor, n_branches: int) -> torch.Tensor:
    """[d, P·B] float from permuted labels [P, d]: channel j counts toward branch b in perm p."""
    p, d = labels.shape
    ar = torch.arange(n_branches, dtype=labels.dtype)
    return (labels.T[:, :, None] == ar).reshape(d, p * n_branches).float()


def _count_exceed(a: torch.Tensor, obs: torch.Tensor, bank: torch.Tensor, n_branches: int,
                  perm_chunk: int) -> torch.Tensor:
    counts = torch.zeros(a.shape[0], n_branches, dtype=torch.int64, device=a.device)
    tol = 1e-5  # float32 sums: ties (e.g. one-hot directions) must count as exceedances
    for s in range(0, bank.shape[0], perm_chunk):
        m = _indicator(bank[s:s + perm_chunk], n_branches)
        t = (a @ m).view(a.shape[0], -1, n_branches)
        counts += (t >= obs[:, None, :] - tol).sum(1)
    return counts


def permutation_bank(slices: dict[str, slice], n_perm: int, seed: int = 0) -> np.ndarray:
    """[n_perm, d] int8: branch label of each channel under independent random permutations."""
    lab = branch_labels(slices, sum(s.stop - s.start for s in slices.values())).astype(np.int8)
    return np.random.default_rng(seed).permuted(np.tile(lab, (n_perm, 1)), axis=1)


def permutation_pvalues(decoder, slices: dict[str, slice], positive: bool = False, *,
                        n_perm: int = 2000, refine_to: int = 20000, refine_below: int = 5,
                        seed: int = 0, latent_chunk: int = 2048, perm_chunk: int = 250,
                        device: str = "cpu") -> PermutationResult:
    """Channel-permutation p-values for every latent and branch, vectorised.

    All latents share one bank of random permutations (one matrix product per chunk).
    Latents whose smallest exceedance count is below ``refine_below`` get more permutations,
    up to ``refine_to`` in total, so small p-values are resolved well enough for BH across
    thousands of latents (floor 1/(1+refine_to)). Extending only the extreme latents keeps
    each estimate (1+count)/(1+B) close to its exact permutation p-value.
    """
    e = energy(decoder, positive)
    tot = e.sum(1, keepdims=True)
    valid = tot[:, 0] > 0
    a_all = torch.from_numpy(np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0.0)).float()
    a_all = a_all.to(device)
    lab = torch.from_numpy(branch_labels(slices, e.shape[1])).to(device)
    nb = len(slices)
    obs_all = a_all @ torch.nn.functional.one_hot(lab, nb).float()
    bank = torch.from_numpy(permutation_bank(slices, max(n_perm, refine_to), seed)).to(device)
    n = e.shape[0]
    exceed = torch.zeros(n, nb, dtype=torch.int64, device=device)
    used = np.full(n, n_perm, dtype=np.int64)
    for s in range(0, n, latent_chunk):
        sl = slice(s, min(n, s + latent_chunk))
        exceed[sl] = _count_exceed(a_all[sl], obs_all[sl], bank[:n_perm], nb, perm_chunk)
    if refine_to > n_perm:
        todo = np.flatnonzero(valid & (exceed.min(1).values.cpu().numpy() < refine_below))
        for s in range(0, todo.size, latent_chunk):
            idx = torch.from_numpy(todo[s:s + latent_chunk]).to(device)
            exceed[idx] += _count_exceed(a_all[idx], obs_all[idx], bank[n_perm:], nb,
                                         perm_chunk)
        used[todo] = refine_to
    ex = exceed.cpu().numpy()
    p = (1.0 + ex) / (1.0 + used[:, None])
    p[~valid] = np.nan
    return PermutationResult(p=p, exceed=ex, n_perm=used)


def enrichment(shares: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Share of squared norm over channel share (1 = what a branch of that width gets by size)."""
    return shares / (w / w.sum())[None, :]


def dominant_branch(reject: np.ndarray, enrich: np.ndarray) -> np.ndarray:
    """Significant branch with the largest enrichment, or NONE (−1)."""
    e = np.where(reject, np.nan_to_num(enrich, nan=-np.inf), -np.inf)
    dom = np.argmax(e, 1)
    return np.where(reject.any(1), dom, NONE)


def dictionary_normalise(decoder) -> np.ndarray:
    """Decoder with every channel divided by its RMS over all latents (``v_ij / rms_i v_ij``).

    Data-free scale control: whatever channel-level scale the dictionary itself carries (loud
    channels get large entries in every latent; quiet ones small) is removed, so a latent is
    specialised only relative to how the whole dictionary uses those channels. Unlike dividing
    by the activation std, it creates no enrichment for random directions.
    """
    v = _as_np(decoder)
    rms = np.sqrt(np.mean(v * v, axis=0))
    pos = rms[rms > 0]
    rms = np.where(rms > 0, rms, np.median(pos) if pos.size else 1.0)
    return v / rms[None, :]


SCALES = ("dict", "std", "raw")


@dataclass
class BranchTest:
    """All per-latent branch statistics of one layer; arrays are [n] or [n, B]."""

    branches: list[str]
    widths: np.ndarray
    scale: str  # decoder scale the decision used: "dict", "std" or "raw"
    q: float
    paper_ratio: np.ndarray  # raw decoder, the paper's definition
    full_ratio: np.ndarray
    paper_ratio_std: np.ndarray | None  # on the std-normalised decoder (None without std)
    full_ratio_std: np.ndarray | None
    enrichment: np.ndarray  # on the decision scale, full statistic
    p_perm: np.ndarray  # decision p-values (full share, decision scale)
    q_perm: np.ndarray  # their BH-adjusted values (per branch, across latents)
    p_perm_paper: np.ndarray  # positive-part statistic, its own permutation null
    p_beta: np.ndarray  # moment-matched Beta approximation of p_perm
    p_iso: np.ndarray  # isotropic reference (raw decoder); do not use for decisions
    p_perm_scales: dict[str, np.ndarray]  # permutation p on the other scales (controls)
    d_eff: np.ndarray
    n_perm: np.ndarray
    reject: np.ndarray
    reject_paper: np.ndarray
    dominant: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.paper_ratio.shape[0])

    def dominant_names(self) -> list[str]:
        return ["none" if i == NONE else self.branches[i] for i in self.dominant]


def scaled_decoder(decoder, scale: str, std=None) -> np.ndarray:
    """The decoder on one of the SCALES (``std`` needs the channels' activation std)."""
    if scale == "dict":
        return dictionary_normalise(decoder)
    if scale == "std":
        if std is None:
            raise ValueError("scale 'std' needs the channels' activation std")
        return std_normalise(decoder, std)
    if scale == "raw":
        return _as_np(decoder)
    raise ValueError(f"scale must be one of {SCALES}, not {scale!r}")


def analyze_branches(decoder, slices: dict[str, slice], *, std=None, scale: str = "dict",
                     q: float = 0.05, n_perm: int = 2000, refine_to: int = 20000,
                     seed: int = 0, other_scales: bool = True,
                     device: str = "cpu") -> BranchTest:
    """Run every branch statistic for one layer's decoder [n_latents, d].

    The decision (BH at ``q`` per branch across latents, then dominant branch) uses the
    channel-permutation null on the decoder at ``scale`` (default: dictionary-normalised);
    with ``other_scales`` the same test on the other scales (raw, and std when given) is
    reported as a control. Latents are not independent (they share images and directions);
    BH's guarantee assumes independence or positive dependence, so read counts as approximate.
    """
    raw = _as_np(decoder)
    w = widths(slices)
    dec = scaled_decoder(raw, scale, std)
    share_raw, share_raw_pos = branch_shares(raw, slices), branch_shares(raw, slices, True)
    share = branch_shares(dec, slices)
    kw = dict(n_perm=n_perm, refine_to=refine_to, seed=seed, device=device)
    perm = permutation_pvalues(dec, slices, **kw)
    perm_pos = permutation_pvalues(dec, slices, positive=True, **kw)
    others = {}
    if other_scales:
        for sc in SCALES:
            if sc != scale and (sc != "std" or std is not None):
                others[sc] = permutation_pvalues(scaled_decoder(raw, sc, std), slices, **kw).p
    reject, qval = bh_reject(perm.p, q)
    reject_pos, _ = bh_reject(perm_pos.p, q)
    enr = enrichment(share, w)
    dstd = std_normalise(raw, std) if std is not None else None
    return BranchTest(
        branches=list(slices), widths=w, scale=scale, q=q,
        paper_ratio=np.sqrt(share_raw_pos), full_ratio=np.sqrt(share_raw),
        paper_ratio_std=np.sqrt(branch_shares(dstd, slices, True)) if std is not None else None,
        full_ratio_std=np.sqrt(branch_shares(dstd, slices)) if std is not None else None,
        enrichment=enr, p_perm=perm.p, q_perm=qval, p_perm_paper=perm_pos.p,
        p_beta=beta_approx_pvalues(dec, slices, shares=share),
        p_iso=isotropic_pvalues(share_raw, w), p_perm_scales=others,
        d_eff=effective_dimension(dec), n_perm=perm.n_perm, reject=reject,
        reject_paper=reject_pos, dominant=dominant_branch(reject, enr))


def null_band(decoder, slices: dict[str, slice], positive: bool = True, n_rep: int = 20,
              seed: int = 0, qs: tuple[float, float] = (0.05, 0.95)) -> np.ndarray:
    """5–95 % band of the *sorted* ratio curve under the channel-permutation null.

    Each replicate permutes every latent's values independently, recomputes the ratio per
    branch and sorts it; returns [2, B, n] (low, high) across replicates.
    """
    v = _as_np(decoder)
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_rep):
        vp = rng.permuted(v, axis=1)
        r = np.sqrt(branch_shares(vp, slices, positive))
        curves.append(np.sort(np.nan_to_num(r, nan=0.0), axis=0).T)
    c = np.stack(curves)  # [rep, B, n]
    return np.quantile(c, qs, axis=0)


def layer_table(bt: BranchTest, alive: np.ndarray | None = None) -> list[dict]:
    """One row per branch: counts, expected false positives, enrichment, paper-curve numbers."""
    alive = np.ones(bt.n, bool) if alive is None else np.asarray(alive, bool)
    d = int(bt.widths.sum())
    rows = []
    naive = np.nanargmax(np.nan_to_num(bt.paper_ratio, nan=-1.0), 1)
    for i, b in enumerate(bt.branches):
        sig = bt.reject[:, i]
        dom = bt.dominant == i
        pr = bt.paper_ratio[:, i]
        rows.append({
            "branch": b, "width": int(bt.widths[i]), "channel_share": bt.widths[i] / d,
            "latents": bt.n, "alive": int(alive.sum()),
            "significant": int(sig.sum()), "significant_alive": int((sig & alive).sum()),
            # BH bounds E[false / discoveries] by q, so q·R bounds the expected false ones.
            "expected_false_positives": bt.q * int(sig.sum()),
            "significant_paper_ratio": int(bt.reject_paper[:, i].sum()),
            **{f"significant_{sc}_scale": int(bh_reject(p, bt.q)[0][:, i].sum())
               for sc, p in bt.p_perm_scales.items()},
            "significant_isotropic_reference": int(bh_reject(bt.p_iso, bt.q)[0][:, i].sum()),
            "dominant": int(dom.sum()), "dominant_fraction": float(dom.mean()),
            "dominant_enrichment_vs_channel_share": float(dom.mean() / (bt.widths[i] / d)),
            "naive_argmax_paper_ratio": int((naive == i).sum()),
            "mean_enrichment": float(np.nanmean(bt.enrichment[:, i])),
            "median_enrichment_of_dominant": (float(np.nanmedian(bt.enrichment[dom, i]))
                                              if dom.any() else None),
            "median_paper_ratio": float(np.nanmedian(pr)),
            "paper_ratio_gt_0.5": int(np.sum(pr > 0.5)),
            "paper_ratio_gt_0.9": int(np.sum(pr > 0.9)),
            "isotropic_null_ratio": float(np.sqrt(bt.widths[i] / d)),
        })
    return rows
