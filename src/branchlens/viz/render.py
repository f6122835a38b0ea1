"""The optimisation loop of feature visualization: parameterize -> transform -> model -> Adam.

One call optimises a whole batch (one image per target). The model's weights are frozen for the
duration (only the image parameters get gradients), and the final objective values are measured
on the untransformed images, i.e. on exactly what gets saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from branchlens.data import normalize
from branchlens.viz import param as P
from branchlens.viz.objectives import Objective
from branchlens.viz.relu import redirect_relu_gradients
from branchlens.viz.transform import Transform, compose, standard_transforms


@dataclass
class RenderConfig:
    """Lucid defaults: 512 steps of Adam(lr 0.05) on a 224 px FFT/decorrelated image, with the
    ReLU gradient redirected for the first 16 steps (so units silent on grey can be reached)."""

    size: int = 224
    steps: int = 512
    lr: float = 0.05
    seed: int = 0
    fft: bool = True
    decorrelate: bool = True
    transforms: Sequence[Transform] | None = None  # None: the paper's standard set
    redirect_relu_steps: int = 16  # 0: plain ReLU gradients throughout

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("size", "steps", "lr", "seed", "fft", "decorrelate",
                                           "redirect_relu_steps")}
        return d | {"transforms": "standard" if self.transforms is None else "custom"}


@dataclass
class RenderResult:
    images: Tensor  # [B, 3, H, W] in [0, 1]
    values: Tensor  # [B] objective on the final, untransformed images
    history: list[float] = field(default_factory=list)  # batch-mean objective per step
    trace: Tensor | None = None  # [steps, B] each image's objective per step (transformed)


@contextmanager
def frozen(model: nn.Module):
    """Temporarily stop gradients to the weights (they are not optimised; saves time)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield model.eval()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def evaluate(model: nn.Module, objective: Objective, images01: Tensor) -> Tensor:
    """Objective values [B] of [0, 1] images, without transforms or gradients."""
    with torch.no_grad(), frozen(model):
        acts = model(normalize(images01, model.variant), layers=list(objective.layers))
        return objective(acts).float().cpu()


def render(
    model: nn.Module,
    objective: Objective,
    batch: int,
    cfg: RenderConfig | None = None,
    bar=None,
) -> RenderResult:
    """Optimise ``batch`` images to maximise ``objective`` (each image its own target)."""
    cfg = cfg or RenderConfig()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    params, image_fn = P.image(batch, cfg.size, fft=cfg.fft, decorrelate=cfg.decorrelate,
                               seed=gen, device=device)
    transform = compose(standard_transforms() if cfg.transforms is None else cfg.transforms)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    layers = list(objective.layers)
    history: list[float] = []
    trace: list[Tensor] = []
    with frozen(model):
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            x = transform(image_fn(), gen)
            with redirect_relu_gradients(model, step < cfg.redirect_relu_steps):
                values = objective(model(normalize(x, model.variant), layers=layers))
            (-values.sum()).backward()
            opt.step()
            trace.append(values.detach().float().cpu())
            history.append(float(trace[-1].mean()))
            if bar is not None:
                bar.update(1, objective=f"{history[-1]:.3g}")
    with torch.no_grad():
        images = image_fn().detach()
    return RenderResult(images.cpu(), evaluate(model, objective, images), history,
                        torch.stack(trace) if trace else None)
