"""Shared, cached real-data fixtures for the viz/circuits tests (model, images, small SAEs).

Everything is computed once per test session (``functools.cache``) on a few dozen shared
ImageNet images; SAEs are the real :class:`branchlens.sae.TopKSAE`, trained for a few seconds.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "bvlc_googlenet.safetensors"
IMAGES = SHARED / "data" / "imagenet-sample"
VARIANT = "bvlc_googlenet"
N_IMAGES = 24


def need_shared() -> None:
    if not WEIGHTS.is_file() or not IMAGES.is_dir():
        pytest.skip(f"needs the shared BVLC weights and ImageNet sample under {SHARED}")


class StandInSAE:
    """Minimal TopK SAE with the CONTRACTS API and no torch.nn (checks we rely on the API only)."""

    def __init__(self, W_enc, b_enc, b_pre, W_dec, k):
        self.W_enc, self.b_enc, self.b_pre, self.W_dec, self.k = W_enc, b_enc, b_pre, W_dec, k

    def encode_pre(self, x):
        return (x - self.b_pre) @ self.W_enc.t() + self.b_enc

    def encode(self, x):
        pre = self.encode_pre(x)
        top = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))

    def decode(self, z):
        return z @ self.W_dec + self.b_pre

    def decoder_directions(self):
        return self.W_dec


@cache
def model():
    from branchlens.weights import load_model

    m, _ = load_model(VARIANT, WEIGHTS)
    return m


@cache
def source():
    from branchlens.data import open_source

    return open_source(str(IMAGES), VARIANT)


def image_indices() -> list[int]:
    n = len(source())
    return list(range(0, n, n // N_IMAGES))[:N_IMAGES]


@cache
def inputs() -> torch.Tensor:
    from branchlens.data import iter_batches

    return torch.cat([b.images for b in iter_batches(source(), VARIANT, 24, 0,
                                                     indices=image_indices())])


LAYERS = ("mixed4a", "mixed4b", "mixed4c")


@cache
def _all_activations() -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model()(inputs(), list(LAYERS))


def activations(layer: str) -> torch.Tensor:
    return _all_activations()[layer]


@cache
def trained_sae(layer: str, n_latents: int = 384, k: int = 12, steps: int = 120, seed: int = 0):
    """A real TopKSAE fitted for a few seconds on this layer's activations of the images."""
    from branchlens.sae import SAEConfig, TopKSAE

    a = activations(layer)
    x = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    cfg = SAEConfig.for_layer(VARIANT, layer, expansion=1, k=k)
    cfg.n_latents = n_latents
    sae = TopKSAE(cfg, seed=seed)
    sae.init_from_sample(x[:2048])
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _ = sae.loss(x[torch.randint(len(x), (512,), generator=gen)])
        sae.update(loss, opt)
    return sae.eval()


def excess_share_labels(directions: torch.Tensor, layer: str) -> tuple[np.ndarray, list[str]]:
    """Stand-in branch labels for circuits tests that have no analysis run: the argmax of each
    direction's energy share minus its branch's channel share."""
    from branchlens.variants import branch_slices

    slices = branch_slices(VARIANT, layer)
    sq = directions.float().pow(2)
    share = torch.stack([sq[:, s].sum(1) for s in slices.values()], 1) / sq.sum(1, keepdim=True)
    width = torch.tensor([s.stop - s.start for s in slices.values()], dtype=torch.float32)
    return (share - width / width.sum()).argmax(1).numpy(), list(slices)
