"""Random image transforms applied before every forward pass of feature visualization.

Robustness to small jitter, scale and rotation keeps the optimiser from exploiting the exact
pixel grid (checkerboard and high-frequency artefacts). Each transform draws its randomness per
image from a seeded generator, so a batch of N images behaves like N independent runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _choice(values: Sequence[float], n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(values), (n,), generator=gen)
    return torch.tensor([float(values[i]) for i in idx])


def pad(width: int, value: float = 0.5) -> Transform:
    """Constant padding (grey by default) so jitter and rotation do not wrap or show black."""

    def t(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return F.pad(x, (width, width, width, width), value=value)

    return t


def jitter(d: int) -> Transform:
    """Random crop shrinking each side by ``d`` pixels in total (per-image offsets)."""

    def t(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if d <= 0:
            return x
        h, w = x.shape[-2] - d, x.shape[-1] - d
        oy = torch.randint(d + 1, (x.shape[0],), generator=gen).tolist()
        ox = torch.randint(d + 1, (x.shape[0],), generator=gen).tolist()
        crops = [x[i, :, y:y + h, z:z + w] for i, (y, z) in enumerate(zip(oy, ox, strict=True))]
        return torch.stack(crops)

    return t


def _affine(x: torch.Tensor, scale: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Per-image zoom by ``scale`` and rotation by ``angle_deg`` about the centre, same size."""
    a = angle_deg * math.pi / 180.0
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1),
                         torch.stack([sin, cos, zero], -1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom each image by a factor drawn from ``scales`` (output keeps the input size)."""

    def t(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = _choice(scales, x.shape[0], gen)
        return _affine(x, s, torch.zeros_like(s))

    return t


def random_rotate(angles: Sequence[float]) -> Transform:
    """Rotate each image by an angle in degrees drawn from ``angles``."""

    def t(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a = _choice(angles, x.shape[0], gen)
        return _affine(x, torch.ones_like(a), a)

    return t


def compose(transforms: Sequence[Transform]) -> Transform:
    def t(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for f in transforms:
            x = f(x, gen)
        return x

    return t


def standard_transforms(
    pad_width: int = 12, jitter1: int = 10, scale_range: float = 0.1, rotate_deg: int = 10,
    jitter2: int = 6,
) -> list[Transform]:
    """The paper's Lucent settings: pad 12, jitter 10, scale 0.9-1.1, rotate ±10°, jitter 6."""
    n = 11
    scales = [1 - scale_range + 2 * scale_range * i / (n - 1) for i in range(n)]
    return [pad(pad_width), jitter(jitter1), random_scale(scales),
            random_rotate(list(range(-rotate_deg, rotate_deg + 1))), jitter(jitter2)]
