"""The channel-permutation test engine: Monte-Carlo p-values of branch shares, refined until
Benjamini–Hochberg can decide (see :func:`permutation_pvalues`).

Every rule of :mod:`branchlens.analysis.branches` and every control of
:mod:`branchlens.analysis.controls` runs through it. Permutations come from
:mod:`branchlens.analysis.permute` (numba, reproducible); shares of many latents under many
permutations are one matrix product with the permutations' one-hot, counted in one read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from branchlens.analysis.permute import (
    count_at_least,
    one_hot_rows,
    shuffled_labels,
    shuffled_values,
)

LATENT_CHUNK, PERM_CHUNK = 2048, 512  # latents × permutations per product (~16 MB of shares)
REFINE_BANK = 8192  # label permutations of the deep refinement rounds (see permutation_pvalues)
REFINE_ROWS = 256  # value-permuted rows per product in those rounds


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


def as_np(x) -> np.ndarray:
    """A tensor or array as a numpy array on the CPU (the analysis runs in numpy)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def energy(decoder, positive: bool = False) -> np.ndarray:
    """Per-channel squared values ``v_j²`` (or ``relu(v_j)²``), float64 [n, d]."""
    v = as_np(decoder)
    if positive:
        v = np.maximum(v, 0.0)
    return v * v




def label_bank(labels: np.ndarray, n_perm: int, rng: np.random.Generator,
               strata: np.ndarray | None = None) -> np.ndarray:
    """[n_perm, d] int8 branch labels under independent random channel permutations
    (within each stratum when ``strata`` is given); see :mod:`branchlens.analysis.permute`."""
    return shuffled_labels(labels, n_perm, rng, strata)


def permutation_bank(slices: dict[str, slice], n_perm: int, seed: int = 0) -> np.ndarray:
    """[n_perm, d] int8: branch label of each channel under independent random permutations."""
    lab = branch_labels(slices, sum(s.stop - s.start for s in slices.values()))
    return label_bank(lab, n_perm, np.random.default_rng(seed))


@dataclass
class PermutationResult:
    """Monte-Carlo channel-permutation test: p = (1 + #{T_perm ≥ T_obs}) / (1 + B_i)."""

    p: np.ndarray  # [n, B]; NaN for latents not tested
    exceed: np.ndarray  # [n, B] counts
    n_perm: np.ndarray  # [n] permutations used per latent (adaptive)
    threshold: np.ndarray  # [B] final BH threshold on p (0: nothing rejected)


def branch_indicator(labels: torch.Tensor, n_branches: int) -> torch.Tensor:
    """[d, P·B] float from permuted labels [P, d]: channel j counts toward branch b in perm p."""
    if labels.device.type == "cpu":
        return torch.from_numpy(one_hot_rows(labels.numpy(), n_branches)).T
    p, d = labels.shape
    ar = torch.arange(n_branches, dtype=labels.dtype, device=labels.device)
    return (labels.T[:, :, None] == ar).reshape(d, p * n_branches).float()


TIE_TOL = 1e-5  # float32 sums: ties (e.g. one-hot directions) must count as exceedances


def count_reaching(shares: torch.Tensor, obs: torch.Tensor, counts: torch.Tensor) -> None:
    """``counts`` [L, B] += how many of the permuted ``shares`` [L, P·B] reach ``obs`` [L, B]."""
    threshold = obs - TIE_TOL
    if shares.device.type == "cpu":
        count_at_least(shares.numpy(), threshold.contiguous().numpy(), counts.numpy())
    else:
        nb = obs.shape[1]
        counts += (shares.view(shares.shape[0], -1, nb) >= threshold[:, None, :]).sum(1)


def count_exceedances(a: torch.Tensor, obs: torch.Tensor, ind: torch.Tensor, n_branches: int,
                      perm_chunk: int) -> torch.Tensor:
    """[L, B] counts of permutations whose share reaches the observed one, for the indicator
    ``ind`` [d, P·B] of P permutations (made once per bank, shared by every latent chunk)."""
    counts = torch.zeros(a.shape[0], n_branches, dtype=torch.int64, device=a.device)
    width = perm_chunk * n_branches
    for s in range(0, ind.shape[1], width):
        count_reaching(a @ ind[:, s:s + width], obs, counts)
    return counts


def bh_threshold(p: np.ndarray, q: float) -> np.ndarray:
    """Per column, the BH cut-off t* (reject p ≤ t*; 0 when nothing is rejected); NaN = untested.

    Hand-written because scipy only returns adjusted p-values, and the adaptive Monte-Carlo
    needs the cut-off itself to decide which latents still need permutations."""
    p = np.atleast_2d(np.asarray(p, np.float64).T).T
    out = np.zeros(p.shape[1])
    for c in range(p.shape[1]):
        col = np.sort(p[~np.isnan(p[:, c]), c])
        m = col.size
        if m:
            ok = np.flatnonzero(col <= q * np.arange(1, m + 1) / m)
            out[c] = q * (ok[-1] + 1) / m if ok.size else 0.0
    return out


def _undecided(ex: np.ndarray, used: np.ndarray, t: np.ndarray, min_exceed: int) -> np.ndarray:
    """Where the Monte-Carlo p could still fall on either side of the BH cut-off ``t``.

    Rough Poisson bounds on the exceedance rate (±2√count, +2 at zero counts); a latent is
    decided once its count reaches ``min_exceed`` or its bounds clear the cut-off.
    """
    u = used[:, None].astype(np.float64) + 1
    lo = np.maximum(ex - 2 * np.sqrt(ex), 0) / u
    hi = (ex + 2 + 2 * np.sqrt(ex + 1)) / u
    return (ex < min_exceed) & (lo <= t[None, :]) & (hi >= t[None, :])


def permutation_pvalues(decoder, slices: dict[str, slice], positive: bool = False, *,
                        strata: np.ndarray | None = None, include: np.ndarray | None = None,
                        q: float = 0.05, n_perm: int = 1000, max_perm: int | None = None,
                        min_exceed: int = 10, seed: int = 0, latent_chunk: int = LATENT_CHUNK,
                        perm_chunk: int = PERM_CHUNK, bank_block: int = 16384,
                        labels: np.ndarray | None = None,
                        device: str = "cpu") -> PermutationResult:
    """Channel-permutation p-values for every latent and branch, refined until BH can decide.

    Statistic: the branch's share of ‖v‖² (``positive``: of ‖relu(v)‖²). Null: v's values
    assigned to channels at random (within ``strata`` when given). Every tested latent gets
    ``n_perm`` permutations; then, round after round, latents whose p could still land on
    either side of the current BH cut-off (per branch, at ``q`` over the tested latents) get
    as many again, until they have ``min_exceed`` exceedances, clear the cut-off, or reach
    ``max_perm`` (default ⌈20·m/q⌉, enough to resolve the smallest BH cut-off q/m). So small
    true counts are not lost to a p-value floor, and clearly null latents cost n_perm only.
    Rounds of more than ``bank_block`` permutations draw them as value permutations of the
    few latents left against one fixed label bank (rounded up to whole copies of it).
    ``include`` [n] bool limits the test to those latents (dead ones are left out: NaN).
    ``labels`` [d] replaces the slices' channel→branch map (a relabelling null keeps widths).
    """
    e = energy(decoder, positive)
    n, d = e.shape
    tot = e.sum(1, keepdims=True)
    valid = tot[:, 0] > 0
    if include is not None:
        valid &= np.asarray(include, bool)
    a_all = torch.from_numpy(np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0.0)).float()
    a_all = a_all.to(device)
    labels = branch_labels(slices, d) if labels is None else np.asarray(labels, np.int64)
    nb = len(slices)
    obs_all = a_all @ torch.nn.functional.one_hot(torch.from_numpy(labels).to(device), nb).float()
    m = int(valid.sum())
    max_perm = max(n_perm, max_perm or int(np.ceil(20 * max(m, 1) / q)))
    rng = np.random.default_rng(seed)
    ex = np.zeros((n, nb), np.int64)
    used = np.zeros(n, np.int64)
    todo, add = np.flatnonzero(valid), n_perm
    t = np.zeros(nb)
    refine: torch.Tensor | None = None  # one-hot of the fixed bank of the deep rounds
    while todo.size:
        if add <= bank_block:
            # All latents of a round share the same fresh permutations.
            bank = torch.from_numpy(label_bank(labels, add, rng, strata))
            ind = branch_indicator(bank.to(device), nb)
            for c in range(0, todo.size, latent_chunk):
                idx = todo[c:c + latent_chunk]
                it = torch.from_numpy(idx).to(device)
                ex[idx] += count_exceedances(a_all[it], obs_all[it], ind, nb,
                                             perm_chunk).cpu().numpy()
        else:
            # Deep rounds (few latents, many permutations): a fixed bank of REFINE_BANK label
            # permutations against fresh value permutations of each latent (see
            # permute.shuffled_values): copies × REFINE_BANK new draws per latent for the
            # price of `copies` rows, instead of a fresh bank of `add` permutations each round.
            if refine is None:
                refine = branch_indicator(torch.from_numpy(
                    label_bank(labels, REFINE_BANK, rng, strata)).to(device), nb)
            copies = -(-add // REFINE_BANK)
            step = max(1, REFINE_ROWS // copies)
            for c in range(0, todo.size, step):
                idx = todo[c:c + step]
                it = torch.from_numpy(idx).to(device)
                rows = torch.from_numpy(shuffled_values(a_all[it].cpu().numpy(),
                                                        copies, rng, strata)).to(device)
                obs = obs_all[it].repeat_interleave(copies, 0)
                got = count_exceedances(rows, obs, refine, nb, perm_chunk)
                ex[idx] += got.view(idx.size, copies, nb).sum(1).cpu().numpy()
            add = copies * REFINE_BANK
        used[todo] += add
        with np.errstate(invalid="ignore"):
            p = np.where(valid[:, None], (1.0 + ex) / (1.0 + used[:, None]), np.nan)
        t = bh_threshold(p, q)
        und = _undecided(ex, used, np.maximum(t, q / max(m, 1)), min_exceed)
        todo = np.flatnonzero(valid & (used < max_perm) & und.any(1))
        if todo.size:
            add = int(min(used[todo].max(), max_perm - used[todo].min()))
    with np.errstate(invalid="ignore"):
        p = np.where(valid[:, None], (1.0 + ex) / (1.0 + used[:, None]), np.nan)
    return PermutationResult(p=p, exceed=ex, n_perm=used, threshold=bh_threshold(p, q))
