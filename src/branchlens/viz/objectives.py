"""Feature-visualization objectives: functions of named activations -> one value per image.

Every constructor takes one target per image (``latents[i]`` is optimised in image ``i``), so a
batch of N images optimises N different features in one forward/backward pass; images in a batch
never interact (the model has no batch-coupled layers). Objectives add and scale like numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from branchlens.variants import Variant, branch_slices
from branchlens.viz.latents import EncoderAffine, SAELike, encoder_affine, sae_d_in

Position = str | tuple[int, int]  # "center" | "mean" | (y, x)


@dataclass(frozen=True)
class Objective:
    """``obj(acts) -> Tensor [B]`` to be maximised; ``layers`` are the activations it reads."""

    layers: tuple[str, ...]
    fn: Callable[[dict[str, Tensor]], Tensor]
    name: str = "objective"

    def __call__(self, acts: dict[str, Tensor]) -> Tensor:
        return self.fn(acts)

    def __add__(self, other: Objective) -> Objective:
        layers = tuple(dict.fromkeys(self.layers + other.layers))
        return Objective(layers, lambda a: self(a) + other(a), f"{self.name}+{other.name}")

    def __mul__(self, w: float) -> Objective:
        return Objective(self.layers, lambda a: w * self(a), f"{w}*{self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return self * -1.0

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)


def _per_image(targets: int | Sequence[int], batch: int) -> Tensor:
    t = torch.as_tensor([targets] * batch if isinstance(targets, int) else list(targets))
    if t.numel() != batch:
        raise ValueError(f"{t.numel()} targets for a batch of {batch} images")
    return t.long()


def _vectors_at(act: Tensor, position: Position) -> Tensor:
    """[B, C, H, W] -> [B, C] at the centre / a fixed position, or [B, C, H*W] for "mean"."""
    if position == "mean":
        return act.flatten(2)
    if position == "center":
        y, x = act.shape[-2] // 2, act.shape[-1] // 2
    else:
        y, x = position
    return act[:, :, y, x]


def _branch_mask(variant: str | Variant, layer: str, branch: str | None, d: int) -> Tensor | None:
    if branch is None:
        return None
    slices = branch_slices(variant, layer)
    if branch not in slices:
        raise KeyError(f"{layer} has no branch {branch!r}; branches: {list(slices)}")
    mask = torch.zeros(d)
    mask[slices[branch]] = 1.0
    return mask


def channel(layer: str, channels: int | Sequence[int]) -> Objective:
    """Mean activation of a channel over all positions."""

    def fn(acts: dict[str, Tensor]) -> Tensor:
        a = acts[layer]
        idx = _per_image(channels, a.shape[0]).to(a.device)
        return a[torch.arange(a.shape[0]), idx].mean((-2, -1))

    return Objective((layer,), fn, f"channel:{layer}")


def neuron(layer: str, channels: int | Sequence[int], position: Position = "center") -> Objective:
    """Activation of a channel at one position (the centre by default)."""

    def fn(acts: dict[str, Tensor]) -> Tensor:
        a = acts[layer]
        idx = _per_image(channels, a.shape[0]).to(a.device)
        return _vectors_at(a, position)[torch.arange(a.shape[0]), idx]

    return Objective((layer,), fn, f"neuron:{layer}")


def linear(layer: str, weights: Tensor, bias: Tensor | None = None,
           position: Position = "center", name: str = "linear") -> Objective:
    """``w_i · x + b_i`` per image i, at a position or averaged over positions."""

    def fn(acts: dict[str, Tensor]) -> Tensor:
        a = acts[layer]
        w = weights.to(a)
        if w.shape[0] != a.shape[0]:
            raise ValueError(f"{w.shape[0]} weight vectors for a batch of {a.shape[0]} images")
        v = _vectors_at(a, position)
        out = (v * w.unsqueeze(-1)).sum(1).mean(-1) if v.dim() == 3 else (v * w).sum(1)
        return out if bias is None else out + bias.to(out)

    return Objective((layer,), fn, name)


def sae_latent(
    sae: SAELike | EncoderAffine,
    layer: str,
    latents: Sequence[int],
    position: Position = "center",
    branch: str | None = None,
    variant: str | Variant | None = None,
) -> Objective:
    """SAE encoder pre-activation of ``latents[i]`` in image i.

    ``branch`` keeps only that branch's channels of the encoder row (and drops the constant
    term), i.e. what the latent's e.g. 5x5 part alone responds to; needs ``variant``.
    """
    enc = sae if isinstance(sae, EncoderAffine) else encoder_affine(sae, sae_d_in(sae))
    idx = torch.as_tensor(list(latents)).long()
    W, c = enc.W[idx], enc.c[idx]
    if branch is not None:
        W = W * _branch_mask(_need(variant), layer, branch, W.shape[1])
        c = None
    tag = f"sae_latent:{layer}" + (f":{branch}" if branch else "")
    return linear(layer, W, c, position, tag)


def direction(
    layer: str,
    vectors: Tensor,
    position: Position = "center",
    cossim_pow: float = 1.0,
    cos_floor: float = 0.1,
    mask: Tensor | None = None,
) -> Objective:
    """Cosine-weighted dot ``(x·v̂)·max(cos(x, v), floor)^pow`` per image, per position.

    The cosine factor rewards pointing *along* v rather than merely having a large norm; this
    is the paper's (Lucent's) decoder-direction objective. ``mask`` restricts both x and v to
    some channels.
    """

    def fn(acts: dict[str, Tensor]) -> Tensor:
        a = acts[layer]
        v = vectors.to(a)
        if mask is not None:
            m = mask.to(a)
            v = v * m
            a = a * m.view(1, -1, 1, 1)
        x = _vectors_at(a, position)
        if x.dim() == 2:
            x = x.unsqueeze(-1)
        vh = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
        dot = (x * vh.unsqueeze(-1)).sum(1)
        cos = dot / x.norm(dim=1).clamp_min(1e-4)
        return (dot * cos.clamp(min=cos_floor) ** cossim_pow).mean(-1)

    return Objective((layer,), fn, f"direction:{layer}")


def sae_direction(
    sae: SAELike,
    layer: str,
    latents: Sequence[int],
    position: Position = "center",
    branch: str | None = None,
    variant: str | Variant | None = None,
    cossim_pow: float = 1.0,
) -> Objective:
    """The paper's objective: activation · decoder direction of ``latents[i]``, cosine-weighted."""
    dirs = sae.decoder_directions().detach().float().cpu()
    idx = torch.as_tensor(list(latents)).long()
    mask = None if branch is None else _branch_mask(_need(variant), layer, branch, dirs.shape[1])
    obj = direction(layer, dirs[idx], position, cossim_pow, mask=mask)
    tag = f"sae_direction:{layer}" + (f":{branch}" if branch else "")
    return Objective(obj.layers, obj.fn, tag)


def _need(variant: str | Variant | None) -> str | Variant:
    if variant is None:
        raise ValueError("a branch-restricted objective needs the model variant")
    return variant
