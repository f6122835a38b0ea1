"""Image parameterizations for feature visualization (Lucid style).

An image is optimised in a decorrelated space: Fourier coefficients scaled by 1/f (so every
frequency band learns at a similar rate, which suppresses the high-frequency noise that
pixel-space optimisation produces), mapped through the square root of ImageNet's colour
correlation (so Adam steps are whitened in colour too), then squashed into [0, 1] by a sigmoid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Square root of the RGB colour covariance of ImageNet pixels in [0, 1]: columns are the
# covariance eigenvectors scaled by the square root of their eigenvalues (U·sqrt(S)). These are
# the values Lucid publishes; :func:`color_correlation_sqrt` re-derives them from any image set
# (tests check that the shared ImageNet sample gives the same matrix).
IMAGENET_COLOR_SQRT = np.array([[0.26, 0.09, 0.02],
                                [0.27, 0.00, -0.05],
                                [0.27, -0.09, 0.03]], dtype=np.float32)

ImageFn = Callable[[], torch.Tensor]


def color_correlation_sqrt(pixels: np.ndarray) -> np.ndarray:
    """U·sqrt(S) of the RGB covariance of ``pixels`` [N, 3] in [0, 1], Lucid's sign convention.

    Columns are ordered by eigenvalue; each column's sign is chosen so its first (red) entry is
    positive, or its largest-magnitude entry when red is ~0.
    """
    cov = np.cov(np.asarray(pixels, dtype=np.float64), rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    m = evecs * np.sqrt(evals)[None, :]
    for c in range(3):
        col = m[:, c]
        ref = col[0] if abs(col[0]) > 0.1 * np.abs(col).max() else col[np.abs(col).argmax()]
        if ref < 0:
            m[:, c] = -m[:, c]
    return m.astype(np.float32)


def _normalized_color_matrix(matrix: np.ndarray | None = None) -> torch.Tensor:
    m = torch.as_tensor(IMAGENET_COLOR_SQRT if matrix is None else matrix, dtype=torch.float32)
    return m / m.norm(dim=0).max()


def decorrelated_to_rgb(t: torch.Tensor, matrix: np.ndarray | None = None) -> torch.Tensor:
    """[B, 3, H, W] decorrelated colour -> correlated RGB logits (before the sigmoid)."""
    m = _normalized_color_matrix(matrix).to(t)
    return torch.einsum("ij,bjhw->bihw", m, t)


def rfft2d_freqs(h: int, w: int) -> torch.Tensor:
    """|f| of every coefficient of an ``rfft2`` of an h x w image, in cycles per pixel."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def fft_image(
    batch: int,
    size: int | tuple[int, int],
    *,
    sd: float = 0.01,
    decay_power: float = 1.0,
    seed: int | torch.Generator = 0,
    device: str | torch.device = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """Fourier parameterization: (params, fn) where ``fn()`` -> decorrelated image [B, 3, H, W].

    Coefficients are scaled by ``1 / max(|f|, 1/max(h, w)) ** decay_power`` and inverted with
    the orthonormal transform, so the initial image is near grey (pre-sigmoid std ≈ 0.02 at
    224 px). Lucid multiplies the spectrum by ``sqrt(h*w)`` only because TensorFlow's
    ``irfft2d`` divides by ``h*w``: the net transform is the orthonormal one. Multiplying by
    ``sqrt(h*w)`` *and* using ``norm="ortho"`` starts (and keeps) the optimisation in the
    sigmoid's clipped regime: saturated speckle instead of a picture.
    """
    h, w = (size, size) if isinstance(size, int) else size
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    freqs = rfft2d_freqs(h, w)
    scale = (1.0 / freqs.clamp(min=1.0 / max(h, w)) ** decay_power).to(device)
    spectrum = (torch.randn(batch, 3, *freqs.shape, 2, generator=gen) * sd).to(device)
    spectrum.requires_grad_(True)

    def image() -> torch.Tensor:
        coeffs = torch.view_as_complex(spectrum) * scale
        img = torch.fft.irfft2(coeffs, s=(h, w), norm="ortho")
        return img / 4.0  # Lucid's constant: keeps the initial image close to grey

    return [spectrum], image


def pixel_image(
    batch: int, size: int | tuple[int, int], *, sd: float = 0.01,
    seed: int | torch.Generator = 0, device: str | torch.device = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """Plain pixel parameterization (for comparison; noisier results than :func:`fft_image`)."""
    h, w = (size, size) if isinstance(size, int) else size
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    t = (torch.randn(batch, 3, h, w, generator=gen) * sd).to(device).requires_grad_(True)
    return [t], lambda: t


def to_valid_rgb(image_fn: ImageFn, decorrelate: bool = True) -> ImageFn:
    """Wrap a parameterization: colour decorrelation then sigmoid -> [0, 1] RGB."""

    def rgb() -> torch.Tensor:
        t = image_fn()
        if decorrelate:
            t = decorrelated_to_rgb(t)
        return torch.sigmoid(t)

    return rgb


def image(
    batch: int, size: int | tuple[int, int], *, fft: bool = True, decorrelate: bool = True,
    sd: float = 0.01, seed: int | torch.Generator = 0, device: str | torch.device = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """The default parameterization: FFT + colour decorrelation + sigmoid; ``fn()`` in [0, 1]."""
    make = fft_image if fft else pixel_image
    params, fn = make(batch, size, sd=sd, seed=seed, device=device)
    return params, to_valid_rgb(fn, decorrelate)
