"""TopK sparse autoencoder: the paper's k-sparse SAE plus Gao et al.'s fixes.

``z = ReLU(TopK_k(W_enc (s·x − b_pre) + b_latent))``, ``x̂ = (W_dec z + b_pre) / s`` with a fixed
input scale ``s`` (E‖s·x‖² = d). Decoder rows are stored as ``W_dec [n_latents, d_in]`` so that
decoding is a weighted sum of k rows per vector (``F.embedding_bag``): forward and backward never
form the dense ``[B, n_latents]`` code. The encoder backward (:class:`_TopKGather`) likewise only
touches the k selected rows of ``W_enc``.

Decoders: ``tied`` (the paper: W_dec ≡ W_enc, one parameter) or ``untied`` (Gao et al.: starts
as the encoder transpose, rows kept unit-norm, parallel gradient component removed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
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


def _weighted_rows(idx: Tensor, w: Tensor, W: Tensor) -> Tensor:
    return F.embedding_bag(idx, W, per_sample_weights=w, mode="sum")


class _TopKGather(torch.autograd.Function):
    """``pre.gather(1, idx)`` where ``pre = xc @ W.T + b`` was computed without autograd.

    Backward touches only the selected entries: the gradient wrt the pre-activations is zero
    outside ``idx``, so grad W is a sum of B·k outer products (:func:`scatter_outer`),
    grad xc = Σ_j g_j W[idx_j] (an ``embedding_bag``) and grad b a scatter-add.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W: Tensor, b: Tensor, pre: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W, idx)
        return pre.gather(1, idx)

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

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B, k] ≥ 0, indices [B, k]); differentiable wrt the parameters, sparsely."""
        xc = self.center(x)
        with torch.no_grad():
            pre = torch.addmm(self.b_latent, xc, self.W_enc.t())
            idx = pre.topk(self.cfg.k, dim=1, sorted=False).indices
        vals = _TopKGather.apply(xc, self.W_enc, self.b_latent, pre, idx)
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
        (sum over processes) is only needed for the AuxK normaliser.
        """
        cfg = self.cfg
        nb = global_batch or x.shape[0]
        xs = x * cfg.scale
        xc = xs - self.b_pre
        with torch.no_grad():
            pre = torch.addmm(self.b_latent, xc, self.W_enc.t())
            idx = pre.topk(cfg.k, dim=1, sorted=False).indices
        vals = F.relu(_TopKGather.apply(xc, self.W_enc, self.b_latent, pre, idx))
        W = self.W_dec_rows
        xhat = sparse_decode(vals, idx, W) + self.b_pre
        err = (xhat - xs).pow(2).sum(1)  # per-sample squared error, scaled units
        if cfg.loss == "paper":
            recon = (err / xs.pow(2).sum(1).clamp_min(1e-12)).sum() / nb
        else:
            recon = err.sum() / (nb * (cfg.var_total or cfg.d_in))
        stats = {"sse": err.detach().sum(), "nmse_sum": (err / xs.pow(2).sum(1).clamp_min(1e-12))
                 .detach().sum(), "l0_sum": (vals > 0).sum().to(err.dtype), "idx": idx,
                 "l0_mask": vals.detach() > 0, "aux": torch.zeros((), dtype=err.dtype)}
        loss = recon
        if cfg.aux and dead is not None and bool(dead.any()):
            dead_idx = dead.nonzero().squeeze(1)
            k_aux = min(cfg.k_aux, dead_idx.numel())
            with torch.no_grad():
                sub = pre.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False).indices
                aux_idx = dead_idx[sub]
            aux_vals = F.relu(_TopKGather.apply(xc, self.W_enc, self.b_latent, pre, aux_idx))
            resid = (xs - xhat).detach()
            ehat = sparse_decode(aux_vals, aux_idx, W)
            denom = resid.pow(2).sum().detach()
            if allreduce is not None:
                denom = allreduce(denom.clone())
            aux = (ehat - resid).pow(2).sum() / denom.clamp_min(1e-12)
            loss = loss + cfg.aux_coef * aux
            stats["aux"] = aux.detach()  # this process's share: sums to the global value
        return loss, stats

    @torch.no_grad()
    def update(self, loss: Tensor, opt: torch.optim.Optimizer,
               sync_grads: Callable[[], None] | None = None) -> None:
        """One training update: backward → (sum gradients over ranks) → drop each decoder
        row's parallel gradient → optimizer step → rows back to unit norm. Every training loop
        goes through here: forgetting one of these calls silently breaks the unit-norm decoder.
        """
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if sync_grads is not None:
            sync_grads()
        self.remove_parallel_grad()
        opt.step()
        self.normalize_decoder()

    @torch.no_grad()
    def count_firing(self, info: dict[str, Tensor], n_vectors: int,
                     allreduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Update the dead-latent counters after a batch of ``n_vectors`` (all ranks): a latent
        that fired anywhere resets to 0, every other one ages by the batch."""
        fired = torch.bincount(info["idx"][info["l0_mask"]], minlength=self.cfg.n_latents)
        if allreduce is not None:
            fired = allreduce(fired)
        self.since_fired += n_vectors
        self.since_fired[fired > 0] = 0

    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each unit-norm decoder row (untied only)."""
        if self.cfg.decoder == "untied" and self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project decoder rows back to unit norm (untied only; tied follows the paper)."""
        if self.cfg.decoder == "untied":
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

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
