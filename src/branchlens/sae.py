"""TopK sparse autoencoder: the paper's k-sparse SAE plus Gao et al.'s fixes.

``z = ReLU(TopK_k(W_enc (s·x − b_pre) + b_latent))``, ``x̂ = (W_dec z + b_pre) / s`` with a fixed
input scale ``s`` (E‖s·x‖² = d). Decoder rows are stored as ``W_dec [n_latents, d_in]`` so that
decoding is a weighted sum of k rows per vector: forward and backward never form the dense
``[B, n_latents]`` code, and the encoder backward only touches the k selected rows of ``W_enc``,
so the encoder's forward GEMM is the only dense work of a training step. On the CPU the sparse
rest runs in :mod:`branchlens.sae_kernels` (selection, decode, gradients computed with the loss);
elsewhere in torch ops (``F.embedding_bag``, :class:`_TopKGather`, :class:`_SparseDecode`).

Decoders: ``tied`` (the paper: W_dec ≡ W_enc, one parameter) or ``untied`` (Gao et al.: starts
as the encoder transpose, rows kept unit-norm, parallel gradient component removed).

One file, over 450 lines, because the model, its autograd functions and the kernel dispatch
share one private workspace and one sparse layout, and change together (kernels: ``sae_kernels``).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchlens.artifacts import load_tensors, provenance, save_tensors, write_json

DEFAULT_DEAD_AFTER = 10_000_000  # Gao et al.: dead after 10 M tokens without firing
DECODERS = ("untied", "tied")
LOSSES = ("fvu", "paper")
B_PRE_INITS = ("median", "zeros")
WORK_BYTES = 256 * 2**20  # encoder GEMM output held at once: batches beyond it go in row blocks


@dataclass
class SAEConfig:
    """Architecture and data-dependent constants; everything needed to rebuild the model."""

    d_in: int
    n_latents: int
    k: int = 32
    decoder: str = "untied"  # "untied" (Gao et al.) | "tied" (the paper)
    aux: bool | None = None  # AuxK loss; None: on for untied, off for tied
    k_aux: int = 512
    aux_coef: float = 1 / 32
    dead_after: int | None = None  # vectors without firing before a latent counts as dead
    loss: str = "fvu"  # "fvu" (MSE / variance) | "paper" (per-sample mean((x̂−x)²)/mean(x²))
    b_pre_init: str = "median"  # "median" (geometric median of a sample) | "zeros" (paper)
    scale: float = 1.0  # input scale s, fixed at init so that E‖s·x‖² = d_in
    var_total: float | None = None  # E‖s·x − mean‖² of the init sample (FVU denominator)
    layer: str | None = None
    variant: str | None = None
    branch_slices: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be 'tied' or 'untied', not {self.decoder!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'fvu' or 'paper', not {self.loss!r}")
        if self.b_pre_init not in B_PRE_INITS:
            raise ValueError(f"b_pre_init must be 'median' or 'zeros', not {self.b_pre_init!r}")
        if self.n_latents < 1:
            raise ValueError(f"need n_latents >= 1 (expansion >= 1), got {self.n_latents}")
        if not 0 < self.k <= self.n_latents:
            raise ValueError(f"need 0 < k <= n_latents, got k={self.k} with "
                             f"n_latents={self.n_latents}")
        if self.k_aux < 1 or not math.isfinite(self.aux_coef) or self.aux_coef < 0:
            raise ValueError(f"need k_aux >= 1 and a finite aux_coef >= 0, got {self.k_aux}, "
                             f"{self.aux_coef}")
        if self.dead_after is not None and self.dead_after < 1:
            raise ValueError(f"dead_after must be >= 1, got {self.dead_after}")
        if self.aux is None:
            self.aux = self.decoder == "untied"

    @classmethod
    def for_layer(cls, variant: str, layer: str, expansion: int = 16, **kw: Any) -> SAEConfig:
        """Widths and branch slices from :mod:`branchlens.variants` (no hard-coded channels)."""
        from branchlens.variants import branch_slices, get_variant, layer_channels

        v = get_variant(variant)
        d = layer_channels(v, layer)
        slices = {b: [s.start, s.stop] for b, s in branch_slices(v, layer).items()}
        return cls(d_in=d, n_latents=expansion * d, layer=layer, variant=v.name,
                   branch_slices=slices, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def scatter_outer(idx: Tensor, w: Tensor, X: Tensor, n: int) -> Tensor:
    """Σ_{b,j} w[b,j] · X[b] added into row idx[b,j] of an [n, d] matrix, i.e. Sᵀ X for the
    sparse code S [B, n] with k entries per row: one CSR-times-dense product over the B·k
    entries grouped by latent (a radix argsort on CPU), no [B, n] or [B·k, d] intermediate."""
    B, k = idx.shape
    flat = idx.reshape(-1)
    if flat.is_cuda:
        order = torch.argsort(flat)
    else:  # numpy sorts small integers with a radix sort: far faster than torch's CPU sort
        order = torch.from_numpy(np.argsort(flat.numpy().astype(np.int32), kind="stable"))
    crow = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        S = torch.sparse_csr_tensor(crow, order // k, w.reshape(-1)[order].to(X.dtype), (n, B),
                                    check_invariants=False)
    return S @ X


_parts: dict[str, float] | None = None  # seconds per part of the step, while time_parts runs


@contextmanager
def time_parts() -> Iterator[dict[str, float]]:
    """Wall seconds spent in each part of the SAE step (GEMM, selection, decode, gradients,
    Adam, ...) while inside; for the benchmark's breakdown (on the CPU: CUDA runs async)."""
    global _parts
    outer, _parts = _parts, {}
    try:
        yield _parts
    finally:
        _parts = outer


@contextmanager
def _part(name: str) -> Iterator[None]:
    if _parts is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _parts[name] = _parts.get(name, 0.0) + time.perf_counter() - t0


def _kernels():
    """:mod:`branchlens.sae_kernels`, imported on first use (it imports numba)."""
    from branchlens import sae_kernels

    return sae_kernels


def _use_kernels(t: Tensor) -> bool:
    """The numba kernels serve float CPU tensors; anything else takes the torch ops."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and \
        _kernels().ENABLED


class _Workspace:
    """Buffers a training step reuses instead of allocating: a fresh block of tens of MB (the
    GEMM output, the weight gradients) costs page faults comparable to the sparse work. One
    step at a time per SAE (the buffers are overwritten by the next call)."""

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}
        self.lent: dict[str, weakref.ref] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` (dtype and device of ``like``), kept for the next call."""
        buf = self.bufs.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or \
                buf.device != like.device:
            buf = self.bufs[name] = like.new_empty(shape)
        return buf

    def lend(self, name: str, like: Tensor, grad: Tensor | None) -> Tensor:
        """A gradient buffer shaped like ``like`` that autograd may move into ``.grad`` (a new
        tensor on the kept storage). Reused only when the last one lent is gone and ``grad``
        (the parameter's current gradient) does not live in it; else a fresh one."""
        buf, ref = self.bufs.get(name), self.lent.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or \
                buf.device != like.device or (ref is not None and ref() is not None) or \
                (grad is not None and grad.data_ptr() == buf.data_ptr()):
            buf = self.bufs[name] = torch.empty_like(like)
        view = buf.detach()
        self.lent[name] = weakref.ref(view)
        return view


def _weighted_rows(idx: Tensor, w: Tensor, W: Tensor) -> Tensor:
    return F.embedding_bag(idx, W, per_sample_weights=w, mode="sum")


class _TopKGather(torch.autograd.Function):
    """The selected pre-activations ``vals = (xc @ W.T + b).gather(1, idx)``, computed without
    autograd (by :meth:`TopKSAE.select`), given a sparse backward.

    Backward touches only the selected entries: the gradient wrt the pre-activations is zero
    outside ``idx``, so grad W is a sum of B·k outer products (:func:`scatter_outer`),
    grad xc = Σ_j g_j W[idx_j] (an ``embedding_bag``) and grad b a scatter-add.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W: Tensor, b: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, W, idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.contiguous()
        gx = _weighted_rows(idx, g, W) if need_x else None
        gw = scatter_outer(idx, g, xc, W.shape[0]) if need_w else None
        gb = None
        if need_b:
            gb = torch.zeros(W.shape[0], dtype=g.dtype, device=g.device)
            gb.index_add_(0, idx.reshape(-1), g.reshape(-1))
        return gx, gw, gb, None, None


class _Precomputed(torch.autograd.Function):
    """A loss whose gradients wrt ``params`` were computed with it (the CPU kernels): backward
    hands them over, scaled by the incoming gradient, and keeps no reference (so autograd can
    move them into ``.grad`` without a copy)."""

    @staticmethod
    def forward(ctx, grads: list, value: Tensor, *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the SAE loss's gradients were handed over already: build the "
                               "loss again for a second backward")
        if float(g) != 1.0:
            grads = [gr * g for gr in grads]
        return None, None, *grads


class _SparseDecode(torch.autograd.Function):
    """x̂ = Σ_j vals[:, j] · W[idx[:, j]]; backward: grad W only on used rows
    (:func:`scatter_outer`), grad vals only at idx (row-wise dot products)."""

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        ctx.save_for_backward(vals, idx, W)
        return _weighted_rows(idx, vals, W)

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, idx, W = ctx.saved_tensors
        g = g.contiguous()
        gv = gw = None
        if ctx.needs_input_grad[0]:  # dots <g_b, W[idx_bj]> via embedding_bag's own backward
            with torch.enable_grad():
                v = vals.detach().requires_grad_()
                (gv,) = torch.autograd.grad(_weighted_rows(idx, v, W.detach()), v, g)
        if ctx.needs_input_grad[2]:
            gw = scatter_outer(idx, vals, g, W.shape[0])
        return gv, None, gw


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j vals[:, j] · W_dec[idx[:, j]]; backward only touches rows in ``idx``."""
    return _SparseDecode.apply(vals, idx, W_dec)


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; robust centre for ``b_pre`` (Gao et al.), starts at the mean."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(y.norm().item(), 1e-12):
            y = y_new
            break
        y = y_new
    return y.float()


class TopKSAE(nn.Module):
    """TopK SAE working in input units on the outside and scaled units inside."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(cfg.n_latents, cfg.d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)  # unit-norm random directions
        self.W_enc = nn.Parameter(w.clone())
        self.b_latent = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.decoder == "untied":
            self.W_dec = nn.Parameter(w.clone())
        # Vectors seen since each latent last fired; a latent is dead past cfg.dead_after.
        self.register_buffer("since_fired", torch.zeros(cfg.n_latents, dtype=torch.int64))

    @property
    def workspace(self) -> _Workspace:
        """The step's reusable buffers (not state: never saved, rebuilt on demand)."""
        ws = self.__dict__.get("_ws")
        if ws is None:
            ws = self.__dict__["_ws"] = _Workspace()
        return ws

    def release_workspace(self) -> None:
        """Drop the step's buffers (the GEMM output, gradient buffers: up to a few hundred MB);
        the next step or encode allocates them again."""
        self.__dict__.pop("_ws", None)

    # -- parameters ---------------------------------------------------------------------------
    @property
    def W_dec_rows(self) -> Tensor:
        """Decoder rows [n, d] in scaled units (the encoder weight itself when tied)."""
        return self.W_enc if self.cfg.decoder == "tied" else self.W_dec

    def decoder_directions(self) -> Tensor:
        """Decoder rows [n_latents, d_in] in input (activation) units: the contribution of z_i=1."""
        return self.W_dec_rows.detach() / self.cfg.scale

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Fix the input scale, ``b_pre`` and the variance from a data sample (before training)."""
        x = x.detach().float()
        self.cfg.scale = float(math.sqrt(self.cfg.d_in / x.pow(2).sum(1).mean().clamp_min(1e-12)))
        xs = x * self.cfg.scale
        self.cfg.var_total = float((xs - xs.mean(0)).pow(2).sum(1).mean())
        if self.cfg.b_pre_init == "median":
            self.b_pre.copy_(geometric_median(xs))
        else:
            self.b_pre.zero_()

    def dead_mask(self) -> Tensor:
        limit = self.cfg.dead_after or DEFAULT_DEAD_AFTER
        return self.since_fired >= limit

    # -- forward ------------------------------------------------------------------------------
    def center(self, x: Tensor) -> Tensor:
        """The input as the encoder sees it: scaled, minus ``b_pre``."""
        return x * self.cfg.scale - self.b_pre

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [B, n] (before TopK/ReLU), dense."""
        return F.linear(self.center(x), self.W_enc, self.b_latent)

    @torch.no_grad()
    def select(self, xc: Tensor, dead_idx: Tensor | None = None, k_aux: int = 0
               ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """TopK of the pre-activations of the centred input ``xc``, without autograd:
        (values [B, k] before the ReLU, indices [B, k]) and, given ``dead_idx``, the same for
        the ``k_aux`` largest among those latents (AuxK; else None, None).

        The GEMM runs bare into a buffer kept between calls (in row blocks of at most
        :data:`WORK_BYTES`); on the CPU one pass of :func:`sae_kernels.topk_rows` adds the bias
        and selects."""
        kern = _kernels()
        W, b, k = self.W_enc, self.b_latent, self.cfg.k
        B, n = xc.shape[0], W.shape[0]
        vals = xc.new_empty(B, k)
        idx = torch.empty(B, k, dtype=torch.int64, device=xc.device)
        aux = dead_idx is not None and k_aux > 0
        avals = xc.new_empty(B, k_aux) if aux else None
        aidx = torch.empty(B, k_aux, dtype=torch.int64, device=xc.device) if aux else None
        rows = max(1, min(B, WORK_BYTES // (n * xc.element_size())))
        work = self.workspace.get("pre", (rows * n,), xc)
        fast = _use_kernels(xc)
        for lo in range(0, B, rows):
            hi = min(B, lo + rows)
            pre = work[:(hi - lo) * n].view(hi - lo, n)
            if fast:
                with _part("encoder GEMM"):
                    torch.mm(xc[lo:hi], W.t(), out=pre)
                with _part("top-k"):
                    kern.parallel(kern.topk_rows, hi - lo, kern.as_np(pre), kern.as_np(b),
                                  vals[lo:hi].numpy(), idx[lo:hi].numpy())
                if aux:
                    with _part("AuxK top-k"):
                        kern.parallel(kern.topk_cols, hi - lo, kern.as_np(pre), kern.as_np(b),
                                      kern.as_np(dead_idx), avals[lo:hi].numpy(),
                                      aidx[lo:hi].numpy())
                continue
            with _part("encoder GEMM"):
                torch.addmm(b, xc[lo:hi], W.t(), out=pre)
            with _part("top-k"):
                vals[lo:hi], idx[lo:hi] = pre.topk(k, dim=1, sorted=False)
            if aux:
                with _part("AuxK top-k"):
                    sub = pre.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False)
                    avals[lo:hi], aidx[lo:hi] = sub.values, dead_idx[sub.indices]
        return vals, idx, avals, aidx

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B, k] ≥ 0, indices [B, k]); differentiable wrt the parameters, sparsely."""
        xc = self.center(x)
        vals, idx, _, _ = self.select(xc)
        if torch.is_grad_enabled():
            vals = _TopKGather.apply(xc, self.W_enc, self.b_latent, vals, idx)
        return F.relu(vals), idx

    def encode(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        """Dense code z = ReLU(TopK(pre)) of ``x`` [..., d] -> [..., n]; for analysis, not for
        training. ``channel_dim=1`` takes a feature map [B, d, H, W] and gives one code per
        position, [B, n, H, W]."""
        x = x.movedim(channel_dim, -1)
        flat = x.reshape(-1, x.shape[-1])
        vals, idx = self.encode_sparse(flat)
        z = torch.zeros(flat.shape[0], self.cfg.n_latents, dtype=vals.dtype,
                        device=vals.device).scatter(1, idx, vals)
        return z.reshape(*x.shape[:-1], self.cfg.n_latents).movedim(-1, channel_dim)

    def decode(self, z: Tensor, channel_dim: int = -1) -> Tensor:
        """x̂ in input units from a dense code z [..., n] -> [..., d] (``channel_dim`` as in
        :meth:`encode`)."""
        z = z.movedim(channel_dim, -1)
        x = (z @ self.W_dec_rows + self.b_pre) / self.cfg.scale
        return x.movedim(-1, channel_dim)

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """x̂ in input units from the sparse code; never forms [B, n]."""
        return (sparse_decode(vals, idx, self.W_dec_rows) + self.b_pre) / self.cfg.scale

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        vals, idx = self.encode_sparse(x)
        return self.decode_sparse(vals, idx), {"vals": vals, "idx": idx}

    # -- training -----------------------------------------------------------------------------
    def loss(self, x: Tensor, global_batch: int | None = None, dead: Tensor | None = None,
             allreduce=None) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction loss (+ AuxK) summed over this batch and divided by ``global_batch``.

        Dividing by the global batch (not the local one) and summing gradients over processes
        makes data-parallel training equal to one process on the whole batch. ``allreduce``
        (sum over processes) is only needed for the AuxK normaliser. On the CPU the gradients
        are computed here, with the loss (:meth:`_loss_kernels`); ``backward`` hands them over.
        """
        cfg = self.cfg
        nb = global_batch or x.shape[0]
        dead_idx = None
        if cfg.aux and dead is not None and bool(dead.any()):
            dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(cfg.k_aux, dead_idx.numel()) if dead_idx is not None else 0
        if _use_kernels(x) and x.dtype == self.W_enc.dtype and not x.requires_grad:
            return self._loss_kernels(x.contiguous(), nb, dead_idx, k_aux, allreduce)
        xs = x * cfg.scale
        xc = xs - self.b_pre
        p, idx, ap, aidx = self.select(xc.detach(), dead_idx, k_aux)
        vals = F.relu(_TopKGather.apply(xc, self.W_enc, self.b_latent, p, idx))
        W = self.W_dec_rows
        xhat = sparse_decode(vals, idx, W) + self.b_pre
        err = (xhat - xs).pow(2).sum(1)  # per-sample squared error, scaled units
        xsq = xs.pow(2).sum(1).clamp_min(1e-12)
        if cfg.loss == "paper":
            recon = (err / xsq).sum() / nb
        else:
            recon = err.sum() / (nb * (cfg.var_total or cfg.d_in))
        stats = {"sse": err.detach().sum(), "nmse_sum": (err / xsq).detach().sum(),
                 "l0_sum": (vals > 0).sum().to(err.dtype), "idx": idx,
                 "l0_mask": vals.detach() > 0, "aux": torch.zeros((), dtype=err.dtype)}
        loss = recon
        if ap is not None:
            aux_vals = F.relu(_TopKGather.apply(xc, self.W_enc, self.b_latent, ap, aidx))
            resid = (xs - xhat).detach()
            ehat = sparse_decode(aux_vals, aidx, W)
            denom = resid.pow(2).sum().detach()
            if allreduce is not None:
                denom = allreduce(denom.clone())
            aux = (ehat - resid).pow(2).sum() / denom.clamp_min(1e-12)
            loss = loss + cfg.aux_coef * aux
            stats["aux"] = aux.detach()  # this process's share: sums to the global value
        return loss, stats

    def _loss_kernels(self, x: Tensor, nb: int, dead_idx: Tensor | None, k_aux: int, allreduce
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`loss` on the CPU kernels: the same quantities and, when autograd wants them,
        the gradients of every parameter, computed here rather than in a backward pass.

        With R = x̂ − x (scaled units) the loss is Σ_b coef_b/2 ‖R_b‖²; ``decode_residual``
        gives R and the gradient wrt each selected pre-activation, ``scatter_rows`` turns
        those into the weight gradients latent by latent, and b_pre's gradient is
        Σ_b coef_b R_b − (grad b_latent) @ W_enc (b_pre enters x̂ and, negated, the encoder).
        AuxK is the same with R_aux = ê + R and its own coefficient."""
        kern = _kernels()
        cfg = self.cfg
        W_enc, W = self.W_enc, self.W_dec_rows
        params = list(self.parameters())
        grad = torch.is_grad_enabled() and any(q.requires_grad for q in params)
        B, n, k = x.shape[0], W.shape[0], cfg.k
        ws = self.workspace
        xc, xsq = ws.get("xc", tuple(x.shape), x), x.new_empty(B)
        with _part("centre"):
            kern.parallel(kern.center_rows, B, x.numpy(), cfg.scale, kern.as_np(self.b_pre),
                          xc.numpy(), xsq.numpy())
        xsq.clamp_min_(1e-12)
        p, idx, ap, aidx = self.select(xc, dead_idx, k_aux)
        if cfg.loss == "paper":
            coef = 2.0 / (nb * xsq)
        else:
            coef = torch.full_like(xsq, 2.0 / (nb * (cfg.var_total or cfg.d_in)))
        R, sse = ws.get("R", tuple(xc.shape), xc), xc.new_empty(B)
        gp = xc.new_empty((B if grad else 0, k))
        with _part("decode + pre-activation grads"):
            kern.parallel(kern.decode_residual, B, idx.numpy(), p.numpy(), kern.as_np(W),
                          xc.numpy(), -1.0, coef.numpy(), R.numpy(), gp.numpy(), sse.numpy())
        loss = (sse * coef).sum() / 2
        aux_loss = xc.new_zeros(())
        if ap is not None:
            denom = sse.sum()
            if allreduce is not None:
                denom = allreduce(denom.clone())
            denom = denom.clamp_min(1e-12)
            acoef = torch.full_like(sse, 2.0 * cfg.aux_coef / float(denom))
            Ra, asse = ws.get("R_aux", tuple(xc.shape), xc), xc.new_empty(B)
            agp = xc.new_empty((B if grad else 0, aidx.shape[1]))
            with _part("AuxK decode"):
                kern.parallel(kern.decode_residual, B, aidx.numpy(), ap.numpy(), kern.as_np(W),
                              R.numpy(), 1.0, acoef.numpy(), Ra.numpy(), agp.numpy(),
                              asse.numpy())
            aux_loss = asse.sum() / denom
            loss = loss + cfg.aux_coef * aux_loss
        l0_mask = torch.from_numpy(p.numpy() > 0)  # numpy: one thread for [B, k] is plenty
        stats = {"sse": sse.sum(), "nmse_sum": (sse / xsq).sum(),
                 "l0_sum": torch.tensor(float(np.count_nonzero(l0_mask.numpy())), dtype=sse.dtype),
                 "idx": idx, "l0_mask": l0_mask, "aux": aux_loss}
        if not grad:
            return loss, stats
        tied = cfg.decoder == "tied"
        gw = ws.lend("W_enc", W_enc, W_enc.grad)
        gwd = gw if tied else ws.lend("W_dec", W, W.grad)
        gb = torch.empty_like(self.b_latent)
        stats["fired"] = fired = torch.empty(n, dtype=torch.int64)
        parts = [(idx, gp, p, coef, R)]
        if ap is not None:
            parts.append((aidx, agp, ap, acoef, Ra))
        with _part("weight grads (scatter)"):
            for i, (ii, gg, pp, cc, rr) in enumerate(parts):
                crow, order = kern.csr_by_latent(ii.numpy(), n)
                kern.parallel(kern.weight_grads, n, crow, order, ii.shape[1], gg.numpy(),
                              pp.numpy(), xc.numpy(), rr.numpy(), cc.numpy(), gw.numpy(),
                              gwd.numpy(), gb.numpy(), fired.numpy(), i > 0, tied)
        with _part("b_pre grad"):
            gpre = coef @ R - gb @ W_enc.detach()
        grads = {"W_enc": gw, "b_latent": gb, "b_pre": gpre, "W_dec": gwd}
        names = [name for name, _ in self.named_parameters()]
        loss = _Precomputed.apply([grads[nm] for nm in names], loss, *params)
        return loss, stats

    @torch.no_grad()
    def update(self, loss: Tensor, opt: torch.optim.Optimizer,
               sync_grads: Callable[[], None] | None = None) -> None:
        """One training update: backward → (sum gradients over ranks) → drop each decoder
        row's parallel gradient → optimizer step → rows back to unit norm. Every training loop
        goes through here: forgetting one of these calls silently breaks the unit-norm decoder.

        Gradients are set to None first so that backward moves its results in without a zero
        fill and an add; a parameter left without one gets zeros, because Adam skips a missing
        gradient but still moves a parameter whose gradient is zero (its momentum). They are
        dropped again after the step, so the next loss may reuse their memory.
        """
        opt.zero_grad(set_to_none=True)
        with _part("backward"):
            loss.backward()
        for q in self.parameters():
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        if sync_grads is not None:
            sync_grads()
        with _part("parallel-grad removal"):
            self.remove_parallel_grad()
        with _part("Adam"):
            opt.step()
        with _part("decoder normalisation"):
            self.normalize_decoder()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def count_firing(self, info: dict[str, Tensor], n_vectors: int,
                     allreduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Update the dead-latent counters after a batch of ``n_vectors`` (all ranks): a latent
        that fired anywhere resets to 0, every other one ages by the batch."""
        with _part("dead-latent counters"):
            fired = info.get("fired")  # the kernels count while they scatter the gradients
            if fired is None:
                fired = torch.bincount(info["idx"][info["l0_mask"]],
                                       minlength=self.cfg.n_latents)
            if allreduce is not None:
                fired = allreduce(fired)
            self.since_fired += n_vectors
            self.since_fired.masked_fill_(fired > 0, 0)

    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each unit-norm decoder row (untied only)."""
        kern = _kernels()
        if self.cfg.decoder == "untied" and self.W_dec.grad is not None:
            w, g = self.W_dec.detach(), self.W_dec.grad
            if _use_kernels(g) and g.is_contiguous() and g.dtype == w.dtype:
                kern.parallel(kern.project_rows, g.shape[0], g.numpy(), w.numpy())
            else:
                g.sub_(torch.linalg.vecdot(g, w).unsqueeze(1) * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project decoder rows back to unit norm (untied only; tied follows the paper)."""
        kern = _kernels()
        if self.cfg.decoder == "untied":
            w = self.W_dec
            if _use_kernels(w) and w.is_contiguous():
                kern.parallel(kern.normalize_rows, w.shape[0], w.detach().numpy())
            else:
                w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- persistence --------------------------------------------------------------------------
    def save(self, out_dir: str | Path, meta: dict[str, Any] | None = None) -> None:
        """``weights.safetensors`` (with the cfg in its metadata) then ``cfg.json``; atomic."""
        out = Path(out_dir)
        doc = {"sae": self.cfg.to_dict(), **provenance(**(meta or {}))}
        save_tensors(out / "weights.safetensors", dict(self.state_dict()), {"cfg": doc})
        write_json(out / "cfg.json", doc)

    @classmethod
    def load(cls, in_dir: str | Path, device: str = "cpu") -> TopKSAE:
        """Rebuild from a directory written by :meth:`save` (cfg read from the weights file)."""
        tensors, meta = load_tensors(Path(in_dir) / "weights.safetensors", device)
        doc = meta.get("cfg")
        sae = cls(SAEConfig.from_dict(doc["sae"]))
        sae.meta = {k: v for k, v in doc.items() if k != "sae"}
        sae.load_state_dict(tensors)
        return sae.to(device)


def load_meta(in_dir: str | Path) -> dict[str, Any]:
    """The cfg document stored with the weights (cfg, step, seed, store hash, provenance)."""
    _, meta = load_tensors(Path(in_dir) / "weights.safetensors")
    return meta["cfg"]


def import_paper_checkpoint(state: str | Path | dict[str, Tensor], k: int = 32,
                            layer: str | None = None, variant: str | None = None) -> TopKSAE:
    """Load the paper notebook's state dict (``W_enc.weight`` [n, d], ``b_pre``, ``b_latent``;
    tied, no input scaling) into a branchlens SAE that computes exactly the same function."""
    if not isinstance(state, dict):
        path = Path(state)
        if path.suffix == ".safetensors":
            state, _ = load_tensors(path)
        else:
            from branchlens.weights import safe_torch_load

            state = safe_torch_load(path)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    w_enc = state["W_enc.weight"].float()
    n, d = w_enc.shape
    w_dec = state.get("W_dec.weight")  # [d, n] in the notebook's nn.Linear layout
    tied = w_dec is None or torch.equal(w_dec.float().t(), w_enc)
    if layer is not None and variant is not None:
        cfg = SAEConfig.for_layer(variant, layer, expansion=1, k=k)
        cfg.n_latents = n
    else:
        cfg = SAEConfig(d_in=d, n_latents=n, k=k, layer=layer, variant=variant)
    if cfg.d_in != d:
        raise ValueError(f"checkpoint has d_in={d}, but {variant}/{layer} has {cfg.d_in}")
    cfg.decoder = "tied" if tied else "untied"
    cfg.aux, cfg.loss, cfg.b_pre_init, cfg.scale = False, "paper", "zeros", 1.0
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_pre.copy_(state["b_pre"].float())
        sae.b_latent.copy_(state["b_latent"].float())
        if not tied:
            sae.W_dec.copy_(w_dec.float().t())
    return sae
