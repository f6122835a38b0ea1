"""Redirected ReLU gradients for the first steps of feature visualization.

A unit that is negative before its ReLU on the initial (near-grey) image passes no gradient, so
an objective on it stays at exactly 0 however long Adam runs. Quiet units are common among the
5x5 and pool channels and the SAE latents that live there, the ones branch specialization is
about. Lucid's remedy, rebuilt here: where a ReLU lets *no* gradient through for an image, pass
the incoming gradient anyway, except where it would push an already negative input lower. The
forward pass is the plain ReLU, so objective values are unchanged; only the direction of the
first steps differs. Each image's decision is its own (batch members stay independent).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class RedirectedReLU(torch.autograd.Function):
    """ReLU forward; backward redirected per image when the true gradient is all zero."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        relu_grad = grad * (x > 0)
        passes = relu_grad.flatten(1).abs().amax(1) > 0  # [B]: the ReLU lets something through
        # Minimising the loss moves x along -grad: grad > 0 at x < 0 would push x lower.
        redirected = torch.where((x < 0) & (grad > 0), torch.zeros_like(grad), grad)
        return torch.where(passes.view(-1, *[1] * (grad.dim() - 1)), relu_grad, redirected)


def redirected_relu(x: Tensor) -> Tensor:
    return RedirectedReLU.apply(x)


@contextmanager
def redirect_relu_gradients(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Every ReLU of ``model`` (its ``relu_fn``) uses the redirected gradient inside the block."""
    if not enabled:
        yield model
        return
    had = "relu_fn" in vars(model)
    old = model.relu_fn
    model.relu_fn = redirected_relu
    try:
        yield model
    finally:
        if had:
            model.relu_fn = old
        else:
            del model.relu_fn
