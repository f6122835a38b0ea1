"""What viz and circuits need from an SAE, reduced to the CONTRACTS API.

Any object with ``encode_pre``, ``encode``, ``decode`` and ``decoder_directions`` works (the real
:class:`branchlens.sae.TopKSAE` or a stand-in). The encoder pre-activation is affine in the input,
so it is read off once as ``(W, c)`` with ``pre(x) = x @ W.T + c``; objectives then touch only the
rows of the latents being optimised instead of all n_latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class SAELike(Protocol):
    def encode_pre(self, x: Tensor) -> Tensor: ...
    def encode(self, x: Tensor) -> Tensor: ...
    def decode(self, z: Tensor) -> Tensor: ...
    def decoder_directions(self) -> Tensor: ...


@dataclass(frozen=True)
class EncoderAffine:
    """``pre(x) = x @ W.T + c``: W [n_latents, d_in], c [n_latents]."""

    W: Tensor
    c: Tensor

    @property
    def n_latents(self) -> int:
        return self.W.shape[0]


@torch.no_grad()
def encoder_affine(sae: SAELike, d_in: int, check: bool = True) -> EncoderAffine:
    """Recover the affine map of ``sae.encode_pre`` from d_in + 1 probe vectors."""
    probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)])
    dev = next(iter(getattr(sae, "parameters", lambda: iter([torch.zeros(0)]))()), None)
    if dev is not None:
        probes = probes.to(dev.device)
    pre = sae.encode_pre(probes).float().cpu()
    c, W = pre[0], (pre[1:] - pre[0]).t().contiguous()
    if check:
        x = torch.randn(4, d_in, generator=torch.Generator().manual_seed(0))
        ref = sae.encode_pre(x.to(probes.device)).float().cpu()
        got = x @ W.t() + c
        if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-5):
            raise ValueError("sae.encode_pre is not affine in its input")
    return EncoderAffine(W, c)


def sae_d_in(sae: SAELike) -> int:
    cfg = getattr(sae, "cfg", None)
    if cfg is not None and getattr(cfg, "d_in", None):
        return int(cfg.d_in)
    return int(sae.decoder_directions().shape[1])
