"""Latent-to-latent circuits between SAE features of consecutive InceptionV1 blocks.

Layer L's activation is written exactly as ``x_L = Σ_i z_i d_i + b + ε`` (SAE reconstruction
from decoder directions ``d_i``, decoder bias ``b``, and the SAE's error ``ε``). The real network
blocks map x_L to x_{L+1}, where latent j's encoder pre-activation is read at one position of
one of j's top images. Gradient × activation splits ``∇·x_L`` exactly into per-latent terms
``z_i (d_i·∇)``, an error term ``ε·∇`` and a bias term ``b·∇``, so the error's share says how
much of the circuit the SAE does not explain.

Three views: the top upstream latents of a latent (with their dominant branches); branch-to-
branch flow with a label-permutation null (does a specialised branch feed the same branch
downstream?); and a causal check, zeroing one branch of block L in the real forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from branchlens.variants import BRANCHES, branch_slices
from branchlens.viz.latents import SAELike


@dataclass(frozen=True)
class Target:
    """Latent ``latent`` of the downstream layer at (y, x) of source image ``image``."""

    latent: int
    image: int
    y: int
    x: int


@dataclass
class Attribution:
    """Per target: upstream-latent attributions and the exact remainder terms."""

    targets: list[Target]
    latents: Tensor  # [T, n_up] z_i (d_i · ∇)
    error: Tensor  # [T] ε · ∇
    bias: Tensor  # [T] b · ∇
    branches: Tensor  # [T, n_branches] x_L · ∇ over each branch's channels
    value: Tensor  # [T] downstream pre-activation
    branch_names: list[str] = field(default_factory=list)

    def error_share(self) -> Tensor:
        """|ε·∇| / (Σ|z_i d_i·∇| + |ε·∇| + |b·∇|) per target."""
        tot = self.latents.abs().sum(1) + self.error.abs() + self.bias.abs()
        return self.error.abs() / tot.clamp_min(1e-12)


# -- running the real network between two layers -------------------------------------------------

def forward_between(model: nn.Module, x: Tensor, src: str, dst: str) -> Tensor:
    """Block output ``dst`` from block output ``src`` (see ``InceptionV1.forward_between``)."""
    return model.forward_between(x, src, dst)


@contextmanager
def zeroed_branch(model: nn.Module, layer: str, branch: str):
    """Zero one branch of a block in the real forward pass (a hook on its last conv).

    The hook replaces the conv output by zeros; the model's ReLU keeps them zero, so the
    branch's slice of the concatenated block output is exactly 0.
    """
    conv = model.convs[f"{layer}_{branch}"]
    handle = conv.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        yield
    finally:
        handle.remove()


def _to_vectors(a: Tensor) -> Tensor:
    return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])


# -- gradient × activation ------------------------------------------------------------------------

def attribute(
    model: nn.Module,
    sae_up: SAELike,
    sae_down: SAELike,
    up: str,
    down: str,
    x_up: Tensor,
    targets: Sequence[Target],
    chunk: int = 8,
) -> Attribution:
    """Attribution of each target to upstream latents; ``x_up[t]`` is layer ``up`` on target
    t's image [T, C, H, W]. Sparse codes are used (only active latents get a term)."""
    dirs = sae_up.decoder_directions().detach().float()
    n_up, d = dirs.shape
    slices = branch_slices(model.variant, up)
    out_lat, out_err, out_bias, out_br, out_val = [], [], [], [], []
    with torch.no_grad():
        bias = sae_up.decode(torch.zeros(1, n_up, device=dirs.device))[0].float()
    for s in range(0, len(targets), chunk):
        ts = targets[s:s + chunk]
        x = x_up[s:s + chunk].detach().clone().requires_grad_(True)
        y = forward_between(model, x, up, down)
        rows = torch.arange(len(ts))
        vec = y[rows, :, [t.y for t in ts], [t.x for t in ts]]
        pre = sae_down.encode_pre(vec)
        val = pre[rows, [t.latent for t in ts]]
        (g,) = torch.autograd.grad(val.sum(), x)
        with torch.no_grad():
            hw = x.shape[2] * x.shape[3]
            v, gv = _to_vectors(x), _to_vectors(g)
            z = sae_up.encode(v)
            err = v - sae_up.decode(z)
            r, c = z.nonzero(as_tuple=True)
            contrib = z[r, c] * (dirs[c] * gv[r]).sum(1)
            lat = torch.zeros(len(ts) * n_up).index_add_(0, (r // hw) * n_up + c,
                                                         contrib.float())
            out_lat.append(lat.view(len(ts), n_up))
            out_err.append((err * gv).sum(1).view(len(ts), hw).sum(1))
            out_bias.append((gv @ bias).view(len(ts), hw).sum(1))
            xg = (x * g).sum((2, 3))
            out_br.append(torch.stack([xg[:, sl].sum(1) for sl in slices.values()], 1))
            out_val.append(val.detach())
    return Attribution(list(targets), torch.cat(out_lat), torch.cat(out_err),
                       torch.cat(out_bias), torch.cat(out_br), torch.cat(out_val),
                       list(slices))


def targets_from_top(top, latents: Sequence[int], n_images: int) -> list[Target]:
    """Each latent's best ``n_images`` (image, y, x) with a positive value from a top table."""
    out = []
    for j in latents:
        for e in top.entries(j)[:n_images]:
            out.append(Target(int(j), e["image_index"], e["y"], e["x"]))
    return out


def upstream_activations(model: nn.Module, up: str, source, targets: Sequence[Target],
                         batch_size: int = 16) -> Tensor:
    """Layer ``up`` on every target's image, in target order [T, C, H, W]."""
    from branchlens.data import iter_batches

    wanted = sorted({t.image for t in targets})
    device = next(model.parameters()).device
    acts: dict[int, Tensor] = {}
    with torch.no_grad():
        for b in iter_batches(source, model.variant, batch_size, 0, indices=wanted):
            a = model(b.images.to(device), layers=[up])[up]
            acts.update(zip(b.indices, a, strict=True))
    return torch.stack([acts[t.image] for t in targets])


# -- per-latent summaries -------------------------------------------------------------------------

def per_latent(att: Attribution) -> dict[int, dict[str, Tensor]]:
    """Mean over each downstream latent's top images of every attribution term."""
    out: dict[int, dict[str, Tensor]] = {}
    lat = torch.tensor([t.latent for t in att.targets])
    for j in lat.unique().tolist():
        m = lat == j
        out[j] = {"latents": att.latents[m].mean(0), "error": att.error[m].mean(),
                  "bias": att.bias[m].mean(), "branches": att.branches[m].mean(0),
                  "value": att.value[m].mean(), "error_share": att.error_share()[m].mean(),
                  "n": m.sum()}
    return out


def top_upstream(att: Attribution, dominant_up: np.ndarray, branch_names: Sequence[str],
                 top_k: int = 10) -> list[dict]:
    """Per downstream latent: its strongest upstream latents (by |mean attribution|)."""
    rows = []
    for j, agg in per_latent(att).items():
        a = agg["latents"]
        order = a.abs().argsort(descending=True)[:top_k].tolist()
        total = float(a.abs().sum() + agg["error"].abs() + agg["bias"].abs())
        ups = [{"latent": i, "attribution": float(a[i]),
                "share": float(a[i].abs()) / max(total, 1e-12),
                "dominant": _name(dominant_up[i], branch_names)} for i in order if a[i] != 0]
        rows.append({"latent": j, "n_images": int(agg["n"]), "value": float(agg["value"]),
                     "error_attribution": float(agg["error"]),
                     "bias_attribution": float(agg["bias"]),
                     "error_share": float(agg["error_share"]),
                     "branch_attribution": dict(zip(att.branch_names,
                                                    agg["branches"].tolist(), strict=True)),
                     "upstream": ups})
    return rows


def _name(i: int, names: Sequence[str]) -> str:
    return names[i] if 0 <= i < len(names) else "none"


# -- branch-to-branch flow ------------------------------------------------------------------------

@dataclass
class BranchFlow:
    """``observed[b_down, b_up]``: mean share of |attribution| that latents dominant in b_down
    receive from upstream latents dominant in b_up; the null permutes upstream labels."""

    down_branches: list[str]
    up_branches: list[str]
    observed: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    p_value: np.ndarray  # one-sided: P(null ≥ observed)
    n_down: np.ndarray  # latents per downstream branch
    n_perm: int

    def to_dict(self) -> dict:
        return {"down_branches": self.down_branches, "up_branches": self.up_branches,
                "observed": self.observed.tolist(), "null_mean": self.null_mean.tolist(),
                "null_std": self.null_std.tolist(), "p_value": self.p_value.tolist(),
                "n_down": self.n_down.tolist(), "n_perm": self.n_perm}


def branch_flow(
    attributions: Tensor,
    dominant_down: np.ndarray,
    dominant_up: np.ndarray,
    branch_names: Sequence[str] = BRANCHES,
    n_perm: int = 1000,
    seed: int = 0,
) -> BranchFlow:
    """Flow between dominant branches from per-latent attributions [J, n_up] (rows: the
    downstream latents whose dominant branches are ``dominant_down`` [J]). Label −1 = none."""
    a = attributions.abs().double().cpu().numpy()
    a = a / np.clip(a.sum(1, keepdims=True), 1e-12, None)  # each latent counts equally
    nb = len(branch_names)
    up = np.where(np.asarray(dominant_up) < 0, nb, dominant_up).astype(int)
    down = np.asarray(dominant_down).astype(int)
    up_names = list(branch_names) + (["none"] if (up == nb).any() else [])
    n_up_groups = len(up_names)
    rows_by = [np.flatnonzero(down == b) for b in range(nb)]

    def flow(labels: np.ndarray) -> np.ndarray:
        onehot = np.zeros((labels.size, n_up_groups))
        onehot[np.arange(labels.size), labels] = 1
        per = a @ onehot
        return np.stack([per[r].mean(0) if r.size else np.full(n_up_groups, np.nan)
                         for r in rows_by])

    obs = flow(up)
    rng = np.random.default_rng(seed)
    null = np.stack([flow(rng.permutation(up)) for _ in range(n_perm)])
    p = ((null >= obs[None] - 1e-12).sum(0) + 1) / (n_perm + 1)
    p[np.isnan(obs)] = np.nan
    return BranchFlow(list(branch_names), up_names, obs, null.mean(0), null.std(0), p,
                      np.array([r.size for r in rows_by]), n_perm)


# -- causal check ---------------------------------------------------------------------------------

def branch_ablation(
    model: nn.Module, sae_down: SAELike, up: str, down: str, images: Tensor,
    targets: Sequence[Target],
) -> tuple[Tensor, Tensor, list[str]]:
    """(clean values [T], drops [T, n_branches]) of each target latent's pre-activation when
    one branch of block ``up`` is zeroed in the real forward pass; ``images[t]`` is the model
    input of target t."""
    names = list(branch_slices(model.variant, up))

    def values() -> Tensor:
        with torch.no_grad():
            y = model(images, layers=[down])[down]
            rows = torch.arange(len(targets))
            vec = y[rows, :, [t.y for t in targets], [t.x for t in targets]]
            return sae_down.encode_pre(vec)[rows, [t.latent for t in targets]].float()

    clean = values()
    drops = []
    for b in names:
        with zeroed_branch(model, up, b):
            drops.append(clean - values())
    return clean, torch.stack(drops, 1), names


def grouped_by_branch(att_latents: Tensor, dominant_up: np.ndarray, n_branches: int) -> Tensor:
    """Σ of upstream-latent attributions per dominant branch [T, n_branches] (none dropped)."""
    dom = torch.as_tensor(np.asarray(dominant_up), dtype=torch.long)
    out = torch.zeros(att_latents.shape[0], n_branches)
    for b in range(n_branches):
        out[:, b] = att_latents[:, dom == b].sum(1)
    return out
