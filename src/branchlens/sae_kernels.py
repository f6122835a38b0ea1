"""CPU kernels (numba) for the sparse part of a TopK SAE training step.

After the encoder GEMM ``pre = xc @ W_encᵀ`` everything a step does is sparse: pick the k
largest of each row (+ ``b_latent``), decode k rows, k dot products per vector, and scatter
B·k outer products into the two weight gradients. In torch ops these cost about half the GEMM
(``topk`` copies every row into a pair vector; the autograd route recomputes the decode, sorts
the code twice and reads the gathered rows four times); here they are row loops that read
each row once or twice:

* :func:`topk_rows`: per row, chunk maxima (one vectorised pass) bound the k-th largest entry
  from below; only the few chunks above the bound are read again, and a quickselect picks the
  k largest. The bias is added on the fly, so the GEMM runs bare into a reused buffer.
* :func:`decode_residual`: x̂ − x per vector and, from the same k rows while they are in cache,
  the gradient wrt each selected pre-activation.
* :func:`weight_grads` (:func:`scatter_rows` twice): the weight gradients latent by latent
  over a counting-sort CSR (:func:`csr_by_latent`).
* :func:`project_rows`, :func:`normalize_rows`: the unit-norm decoder's two row passes, one
  read of the rows each instead of torch's three.

Random rows are read four at a time (:func:`_axpy4`, the dot products) so that four memory
streams are in flight. Each kernel takes a ``[lo, hi)`` range and releases the GIL;
:func:`parallel` splits the work over ``torch.get_num_threads()`` threads, so the step uses
the cores torch was told to use and no more. Absent numba the model uses torch ops.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba ships with umap-learn, a hard dependency
    numba = None

AVAILABLE = numba is not None
# BRANCHLENS_SAE_KERNELS=0 sends the CPU through the torch ops too (for comparison).
ENABLED = AVAILABLE and os.environ.get("BRANCHLENS_SAE_KERNELS", "1") != "0"
CHUNK = 8  # topk_rows: entries per chunk (measured: 8 beats 4, 16 and 32 at n = 8192)
# reassoc/contract let LLVM vectorise the reductions (float noise only); no nnan/ninf: the
# -inf thresholds and a diverged NaN batch keep their IEEE meaning.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)


def _forget_pool() -> None:  # a forked child inherits the pool object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _jit(fn):
    return numba.njit(nogil=True, fastmath=_FAST, cache=True)(fn) if AVAILABLE else fn


def parallel(kernel: Callable, n_items: int, *args) -> None:
    """``kernel(lo, hi, *args)`` over ``[0, n_items)`` split into one range per torch thread."""
    global _pool
    t = max(1, min(torch.get_num_threads(), n_items))
    if t == 1:
        kernel(0, n_items, *args)
        return
    if _pool is None or _pool[0] != t - 1:
        if _pool is not None:
            _pool[1].shutdown(wait=False)
        _pool = (t - 1, ThreadPoolExecutor(t - 1, thread_name_prefix="sae-kernel"))
    bounds = [n_items * i // t for i in range(t + 1)]
    futures = [_pool[1].submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, t)]
    kernel(bounds[0], bounds[1], *args)  # the calling thread takes the first range
    for f in futures:
        f.result()


@_jit
def _select_top(bv, bi, cnt, k):
    """Quickselect (Hoare): move the k largest of bv[:cnt], with their bi, to the front."""
    lo, hi = 0, cnt - 1
    while lo < hi:
        a, b, c = bv[lo], bv[(lo + hi) // 2], bv[hi]
        piv = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi
        while i <= j:
            while bv[i] > piv:
                i += 1
            while bv[j] < piv:
                j -= 1
            if i <= j:
                bv[i], bv[j] = bv[j], bv[i]
                bi[i], bi[j] = bi[j], bi[i]
                i += 1
                j -= 1
        if k - 1 <= j:  # now bv[lo..j] >= piv >= bv[i..hi]
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            break


@_jit
def topk_rows(lo, hi, pre, bias, out_v, out_i):
    """Rows lo..hi: the k = out_v.shape[1] largest of ``pre[r] + bias`` (unordered).

    The maxima of the row's contiguous chunks of CHUNK, pooled into 2k groups, give a
    threshold T that at least k entries reach (the k-th largest group maximum); only chunks
    whose maximum reaches T are read again (~40 candidates of 8192 on random rows), and a
    quickselect picks the k largest of those candidates."""
    n = pre.shape[1]
    k = out_v.shape[1]
    m = n // CHUNK
    cmax = np.empty(max(m, 1), pre.dtype)
    chunks = np.empty(max(m, 1), np.int64)
    bv = np.empty(n + CHUNK, pre.dtype)
    bi = np.empty(n + CHUNK, np.int64)
    g = min(m, 2 * k)
    gv = np.empty(max(g, 1), pre.dtype)
    gi = np.empty(max(g, 1), np.int64)
    inf = pre.dtype.type(np.inf)
    per = m // g if g >= k else 0  # chunks per group; 0: too few chunks, every entry counts
    for r in range(lo, hi):
        row = pre[r]
        for c in range(m):
            o = c * CHUNK
            mx = row[o] + bias[o]
            for t in range(o + 1, o + CHUNK):
                v = row[t] + bias[t]
                mx = v if v > mx else mx
            cmax[c] = mx
        thr = -inf
        if per > 0:
            for q in range(g):
                gm = -inf
                for c in range(q * per, (q + 1) * per):
                    gm = cmax[c] if cmax[c] > gm else gm
                gv[q] = gm
            _select_top(gv, gi, g, k)
            thr = inf
            for q in range(k):
                thr = gv[q] if gv[q] < thr else thr
        nc = 0
        for c in range(m):  # branch-free: record every chunk, keep those that reach thr
            chunks[nc] = c
            nc += cmax[c] >= thr
        cnt = 0
        for q in range(nc):
            for j in range(chunks[q] * CHUNK, chunks[q] * CHUNK + CHUNK):
                v = row[j] + bias[j]
                bv[cnt] = v
                bi[cnt] = j
                cnt += v >= thr
        for j in range(m * CHUNK, n):
            v = row[j] + bias[j]
            bv[cnt] = v
            bi[cnt] = j
            cnt += v >= thr
        if cnt < k:  # NaN in the row: select among all entries (indices stay in range)
            for j in range(n):
                bv[j] = row[j] + bias[j]
                bi[j] = j
            cnt = n
        _select_top(bv, bi, cnt, k)
        out_v[r] = bv[:k]
        out_i[r] = bi[:k]


@_jit
def topk_cols(lo, hi, pre, bias, cols, out_v, out_i):
    """Rows lo..hi: the k largest of ``pre[r, cols] + bias[cols]`` (AuxK over dead latents)."""
    k = out_v.shape[1]
    bv = np.empty(cols.shape[0], pre.dtype)
    bi = np.empty(cols.shape[0], np.int64)
    for r in range(lo, hi):
        row = pre[r]
        for q in range(cols.shape[0]):
            bv[q] = row[cols[q]] + bias[cols[q]]
            bi[q] = cols[q]
        _select_top(bv, bi, cols.shape[0], k)
        out_v[r] = bv[:k]
        out_i[r] = bi[:k]


@_jit
def center_rows(lo, hi, x, scale, b_pre, xc, xsq):
    """Rows lo..hi: the encoder's input ``xc[b] = scale·x[b] − b_pre`` and ``xsq[b] =
    ‖scale·x[b]‖²`` in one pass."""
    d = x.shape[1]
    s = xc.dtype.type(scale)
    for b in range(lo, hi):
        xb = x[b]
        cb = xc[b]
        q = xc.dtype.type(0)
        for t in range(d):
            v = s * xb[t]
            cb[t] = v - b_pre[t]
            q += v * v
        xsq[b] = q


@_jit
def _axpy4(o, rows, X, w, m):
    """``o += Σ_q w[q]·X[rows[q]]`` for q < m, four rows per sweep over ``o``: four
    independent row streams in flight hide the latency of the random rows."""
    d = o.shape[0]
    q = 0
    while q + 4 <= m:
        x0, x1, x2, x3 = X[rows[q]], X[rows[q + 1]], X[rows[q + 2]], X[rows[q + 3]]
        w0, w1, w2, w3 = w[q], w[q + 1], w[q + 2], w[q + 3]
        for t in range(d):
            o[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]
        q += 4
    for r in range(q, m):
        x, wr = X[rows[r]], w[r]
        for t in range(d):
            o[t] += wr * x[t]


@_jit
def decode_residual(lo, hi, idx, p, W, A, sign, coef, R, gp, sse):
    """Rows lo..hi: ``R[b] = sign·A[b] + Σ_j relu(p[b,j]) W[idx[b,j]]``, ``sse[b] = ‖R[b]‖²``
    and, when ``gp`` has rows, ``gp[b,j] = [p>0]·coef[b]·<R[b], W[idx[b,j]]>`` — the gradient
    of ``Σ_b coef[b]/2·‖R[b]‖²`` wrt the pre-activation behind each selected latent."""
    k = idx.shape[1]
    d = A.shape[1]
    grad = gp.shape[0] > 0
    sg = R.dtype.type(sign)
    rows = np.empty(k, np.int64)
    pos = np.empty(k, np.int64)
    w = np.empty(k, R.dtype)
    for b in range(lo, hi):
        rb = R[b]
        ab = A[b]
        for t in range(d):
            rb[t] = sg * ab[t]
        m = 0
        for j in range(k):  # only the rows that fire are read
            if p[b, j] > 0:
                rows[m], pos[m], w[m] = idx[b, j], j, p[b, j]
                m += 1
        _axpy4(rb, rows, W, w, m)
        s = R.dtype.type(0)
        for t in range(d):
            s += rb[t] * rb[t]
        sse[b] = s
        if not grad:
            continue
        gp[b] = 0
        q = 0
        while q + 4 <= m:  # four dot products per sweep over R[b]
            x0, x1, x2, x3 = W[rows[q]], W[rows[q + 1]], W[rows[q + 2]], W[rows[q + 3]]
            g0 = g1 = g2 = g3 = R.dtype.type(0)
            for t in range(d):
                r = rb[t]
                g0 += r * x0[t]
                g1 += r * x1[t]
                g2 += r * x2[t]
                g3 += r * x3[t]
            gp[b, pos[q]], gp[b, pos[q + 1]] = coef[b] * g0, coef[b] * g1
            gp[b, pos[q + 2]], gp[b, pos[q + 3]] = coef[b] * g2, coef[b] * g3
            q += 4
        for r in range(q, m):
            x = W[rows[r]]
            g = R.dtype.type(0)
            for t in range(d):
                g += rb[t] * x[t]
            gp[b, pos[r]] = coef[b] * g


@_jit
def csr_by_latent(idx, n):
    """Counting sort of the B·k entries of ``idx`` by latent: (row pointers [n+1], entry
    numbers), stable, so each latent's entries keep the batch order (deterministic sums)."""
    flat = idx.ravel()
    crow = np.zeros(n + 1, np.int64)
    for i in flat:
        crow[i + 1] += 1
    for i in range(n):
        crow[i + 1] += crow[i]
    fill = crow[:-1].copy()
    order = np.empty(flat.shape[0], np.int64)
    for e in range(flat.shape[0]):
        i = flat[e]
        order[fill[i]] = e
        fill[i] += 1
    return crow, order


@_jit
def scatter_rows(lo, hi, crow, order, k, w, relu, c, X, out, tot, cnt, accumulate):
    """Latents lo..hi: ``out[i] (+)= Σ_e f(w_e)·c[b_e]·X[b_e]`` over the entries e of latent i
    (b_e = e // k, its vector; f = ReLU or identity), ``tot[i] (+)= Σ_e f(w_e)`` and
    ``cnt[i] = #{e: f(w_e) > 0}``. One weight gradient per call: the encoder's (w = grad wrt
    the pre-activations, X = xc) and the decoder's (w = pre-activations, c = loss coefficient,
    X = R) read different rows, and two passes keep each one's working set in cache."""
    wf = w.ravel()
    most = 0
    for i in range(lo, hi):
        most = max(most, crow[i + 1] - crow[i])
    rows = np.empty(most, np.int64)
    ws = np.empty(most, X.dtype)
    for i in range(lo, hi):
        o = out[i]
        if not accumulate:
            o[:] = 0.0
            tot[i] = 0.0
        s = tot.dtype.type(0)
        m = 0
        nf = 0
        for e in order[crow[i]:crow[i + 1]]:
            g = wf[e]
            if relu and g < 0:
                g = 0
            if g != 0:
                b = e // k
                s += g
                nf += g > 0
                rows[m], ws[m] = b, g * c[b]
                m += 1
        _axpy4(o, rows, X, ws, m)
        tot[i] += s
        cnt[i] = nf


@_jit
def weight_grads(lo, hi, crow, order, k, gp, p, xc, R, coef, gwe, gwd, gb, fired, accumulate,
                 tied):
    """Latents lo..hi: the encoder's gradient (``gwe``, ``gb``) then the decoder's (``gwd``,
    ``fired``; added to ``gwe`` when tied) by :func:`scatter_rows`, in one dispatch."""
    ones = np.ones(xc.shape[0], xc.dtype)  # the encoder's rows carry no coefficient
    spare_f = np.empty(gb.shape[0], gb.dtype)  # sums and counts nobody reads
    spare_i = np.empty(gb.shape[0], np.int64)
    scatter_rows(lo, hi, crow, order, k, gp, False, ones, xc, gwe, gb, spare_i, accumulate)
    scatter_rows(lo, hi, crow, order, k, p, True, coef, R, gwd, spare_f,
                 spare_i if accumulate else fired, accumulate or tied)


@_jit
def project_rows(lo, hi, g, w):
    """Rows lo..hi: ``g[i] −= <g[i], w[i]> w[i]`` (drop the component along the row)."""
    d = g.shape[1]
    for i in range(lo, hi):
        gi = g[i]
        wi = w[i]
        c = g.dtype.type(0)
        for t in range(d):
            c += gi[t] * wi[t]
        for t in range(d):
            gi[t] -= c * wi[t]


@_jit
def normalize_rows(lo, hi, w):
    """Rows lo..hi: ``w[i] /= max(‖w[i]‖, 1e-12)``."""
    d = w.shape[1]
    for i in range(lo, hi):
        wi = w[i]
        q = w.dtype.type(0)
        for t in range(d):
            q += wi[t] * wi[t]
        inv = w.dtype.type(1) / max(np.sqrt(q), w.dtype.type(1e-12))
        for t in range(d):
            wi[t] *= inv


def as_np(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (no copy for a contiguous CPU tensor)."""
    return t.detach().contiguous().numpy()
