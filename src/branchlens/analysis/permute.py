"""Random channel permutations for the permutation tests, made fast (numba) and reproducibly.

Every branch test compares a latent's branch share with the shares it gets when its values are
put into the channels at random. The tests use millions of such permutations per layer (the
adaptive refinement resolves BH cut-offs of q/m), and numpy's ``Generator.permuted`` spends
~25 ns per element on them: half of the analysis' time. Here each permutation is a
Fisher–Yates shuffle (within each activation-std stratum when there are strata) driven by its
own splitmix64 stream, seeded from the caller's numpy ``Generator`` and the permutation's
index, so a bank is the same for any thread count, and the one-hot matrix the tests multiply
with is written straight from the shuffle instead of by a broadcast comparison.
"""

from __future__ import annotations

import numpy as np

from branchlens.sae_kernels import AVAILABLE, parallel

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency (pyproject)
    numba = None

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _jit(fn):
    return numba.njit(nogil=True, cache=True)(fn) if AVAILABLE else fn


@_jit
def _mix(z):
    """splitmix64's output function: a well-mixed 64-bit value from a counter."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@_jit
def _fisher_yates(row, order, starts, state):
    """Shuffle ``row`` in place within each stratum (``order``/``starts``), drawing from the
    splitmix64 stream that continues ``state``."""
    for s in range(starts.size - 1):
        base = starts[s]
        for i in range(starts[s + 1] - base - 1, 0, -1):
            state += _GOLDEN
            x = _mix(state)
            # Lemire's multiply-shift on 32 bits: bias < (i+1)/2**32, far below MC noise
            k = ((x >> np.uint64(32)) * np.uint64(i + 1)) >> np.uint64(32)
            a, b = order[base + i], order[base + np.int64(k)]
            row[a], row[b] = row[b], row[a]


@_jit
def _shuffle(lo, hi, labels, order, starts, seed, first, out):
    """Rows lo..hi of ``out`` [P, d]: ``labels`` permuted within each stratum.

    ``order`` lists the channels stratum by stratum, ``starts`` [S+1] where each begins.
    Row p's stream is splitmix64 from ``mix(seed + (first + p)·golden)``.
    """
    d = labels.size
    for p in range(lo, hi):
        state = _mix(seed + np.uint64(first + p) * _GOLDEN)
        row = out[p]
        for j in range(d):
            row[j] = labels[j]
        _fisher_yates(row, order, starts, state)


@_jit
def _one_hot(lo, hi, bank, n_branches, out):
    """Rows lo..hi of the bank → ``out`` [P·B, d] float32: out[p·B + b, j] = (bank[p, j] == b)."""
    d = bank.shape[1]
    for p in range(lo, hi):
        for b in range(n_branches):
            r = out[p * n_branches + b]
            for j in range(d):
                r[j] = 1.0 if bank[p, j] == b else 0.0


@_jit
def _count_at_least(lo, hi, shares, threshold, counts):
    """Rows lo..hi: counts[l, b] += #{p: shares[l, p·B + b] >= threshold[l, b]}."""
    nb = threshold.shape[1]
    n_perm = shares.shape[1] // nb
    for r in range(lo, hi):
        for p in range(n_perm):
            for b in range(nb):
                if shares[r, p * nb + b] >= threshold[r, b]:
                    counts[r, b] += 1


def count_at_least(shares: np.ndarray, threshold: np.ndarray, counts: np.ndarray) -> None:
    """Add to ``counts`` [L, B] (int64) how many of the P permuted shares ``shares`` [L, P·B]
    reach ``threshold`` [L, B]: one read of the shares instead of a compare and a reduction."""
    parallel(_count_at_least, shares.shape[0], shares, threshold, counts)


@_jit
def _shuffle_values(lo, hi, a, source, order, starts, seed, out):
    """Rows lo..hi of ``out`` [R, d]: row ``a[source[r]]`` with its values permuted within
    each stratum (the same streams as :func:`_shuffle`, keyed by the output row)."""
    d = a.shape[1]
    for r in range(lo, hi):
        state = _mix(seed + np.uint64(r) * _GOLDEN)
        row = out[r]
        src = a[source[r]]
        for j in range(d):
            row[j] = src[j]
        _fisher_yates(row, order, starts, state)


def _strata_order(strata: np.ndarray | None, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Channels listed stratum by stratum, and where each stratum starts ([S+1])."""
    st = np.zeros(d, np.int64) if strata is None else np.asarray(strata, np.int64)
    order = np.argsort(st, kind="stable").astype(np.int64)
    starts = np.searchsorted(st[order], np.arange(st.max() + 2 if d else 1)).astype(np.int64)
    return order, starts


def shuffled_values(a: np.ndarray, copies: int, rng: np.random.Generator,
                    strata: np.ndarray | None = None) -> np.ndarray:
    """[L·copies, d] float32: each row of ``a`` [L, d] ``copies`` times (row l's copies are
    rows l·copies … l·copies + copies − 1), its values permuted at random (within strata).

    A value permutation σ of a latent against a fixed label bank gives fresh null draws: the
    share of branch b in ``a∘σ`` under labels ``L∘π`` is the share of ``a`` under ``L∘π∘σ⁻¹``,
    a uniform permutation for any π. Draws sharing π (or σ) are pairwise independent (given π,
    ``a∘σ`` is a uniform arrangement whatever π is), so a count over R value permutations × K
    bank permutations has the variance of R·K independent draws, at the cost of R rows."""
    a = np.ascontiguousarray(a, np.float32)
    order, starts = _strata_order(strata, a.shape[1])
    source = np.repeat(np.arange(a.shape[0], dtype=np.int64), copies)
    out = np.empty((source.size, a.shape[1]), np.float32)
    seed = np.uint64(rng.integers(0, 2**63))
    if out.size:
        parallel(_shuffle_values, source.size, a, source, order, starts, seed, out)
    return out


def shuffled_labels(labels: np.ndarray, n_perm: int, rng: np.random.Generator,
                    strata: np.ndarray | None = None) -> np.ndarray:
    """[n_perm, d] int8: ``labels`` under independent uniform permutations (within strata).

    One 63-bit seed is drawn from ``rng``, so successive calls give fresh permutations and the
    bank depends only on the generator's state.
    """
    lab = np.ascontiguousarray(labels, np.int8)
    d = lab.size
    order, starts = _strata_order(strata, d)
    seed = np.uint64(rng.integers(0, 2**63))
    out = np.empty((n_perm, d), np.int8)
    if n_perm and d:
        parallel(_shuffle, n_perm, lab, order, starts, seed, 0, out)
    return out


def one_hot_rows(bank: np.ndarray, n_branches: int) -> np.ndarray:
    """[P·B, d] float32 one-hot of a label bank [P, d]: row p·B + b marks branch b in perm p."""
    bank = np.ascontiguousarray(bank, np.int8)
    out = np.empty((bank.shape[0] * n_branches, bank.shape[1]), np.float32)
    if bank.size:
        parallel(_one_hot, bank.shape[0], bank, n_branches, out)
    return out
