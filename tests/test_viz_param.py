"""Image parameterization: 1/f spectrum, colour decorrelation derived from real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _vizkit import IMAGES
from branchlens.viz import param as P
from branchlens.viz.transform import jitter, pad, random_rotate, random_scale


def _radial_amplitude(img: torch.Tensor, lo: float, hi: float) -> float:
    f = torch.fft.rfft2(img).abs()
    r = P.rfft2d_freqs(img.shape[-2], img.shape[-1])
    return float(f[..., (r >= lo) & (r < hi)].mean())


def test_fft_image_has_one_over_f_spectrum_and_is_seeded():
    _, fn = P.fft_image(8, 64, seed=3)
    img = fn().detach()
    assert img.shape == (8, 3, 64, 64)
    ratio = _radial_amplitude(img, 0.02, 0.05) / _radial_amplitude(img, 0.3, 0.5)
    assert ratio > 5  # 1/f: roughly f_hi/f_lo ≈ 11
    _, flat = P.fft_image(8, 64, seed=3, decay_power=0.0)
    flat_ratio = _radial_amplitude(flat().detach(), 0.02, 0.05) / _radial_amplitude(
        flat().detach(), 0.3, 0.5)
    assert flat_ratio < 2  # white spectrum without the scaling
    assert torch.equal(img, P.fft_image(8, 64, seed=3)[1]().detach())
    assert not torch.equal(img, P.fft_image(8, 64, seed=4)[1]().detach())


def test_initial_image_is_near_grey_at_every_size():
    """Lucid's start: pre-sigmoid std ≈ 0.02, so the sigmoid is linear and nothing is clipped
    (the sqrt(h*w)-too-large spectrum gave std 4.46 at 224 px: saturated speckle)."""
    for size in (64, 128, 224):
        _, fn = P.fft_image(4, size, seed=0)
        pre = P.decorrelated_to_rgb(fn().detach())
        assert 0.005 < float(pre.std()) < 0.05, (size, float(pre.std()))
        rgb = P.image(4, size, seed=0)[1]().detach()
        assert float((rgb - 0.5).abs().max()) < 0.1


def test_fft_amplitude_is_the_orthonormal_transform():
    """Each free rfft coefficient of the image (x4, Lucid's constant) is exactly the parameter
    times 1/max(|f|, 1/size): the spectrum's amplitude, not only its shape."""
    h, w = 48, 64
    params, fn = P.fft_image(2, (h, w), seed=1)
    img = fn().detach()
    got = torch.fft.rfft2(4.0 * img, norm="ortho")
    want = torch.view_as_complex(params[0].detach()) / P.rfft2d_freqs(h, w).clamp(min=1 / w)
    inner = slice(1, w // 2)  # columns 0 and w/2 are made Hermitian by irfft2
    assert torch.allclose(got[..., inner], want[..., inner], rtol=1e-4, atol=1e-6)


def test_valid_rgb_range_and_gradients_reach_parameters():
    params, fn = P.image(2, 32, seed=0)
    x = fn()
    assert x.min() >= 0 and x.max() <= 1
    x[:, 0].sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


def test_decorrelation_matrix_maps_unit_noise_to_imagenet_colour_correlations():
    t = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    rgb = P.decorrelated_to_rgb(t)[0].flatten(1).numpy()
    corr = np.corrcoef(rgb)
    assert corr[0, 1] > 0.8 and corr[1, 2] > 0.8  # natural images: RGB highly correlated


def test_colour_sqrt_derived_from_shared_imagenet_matches_lucid_constant():
    if not IMAGES.is_dir():
        pytest.skip(f"needs the shared ImageNet sample at {IMAGES}")
    from PIL import Image

    files = sorted(IMAGES.glob("*.JPEG"))[::3]
    px = []
    for f in files:
        im = Image.open(f)
        im.draft("RGB", (64, 64))
        px.append(np.asarray(im.convert("RGB").resize((32, 32)), np.float32).reshape(-1, 3))
    m = P.color_correlation_sqrt(np.concatenate(px) / 255.0)
    assert np.abs(m - P.IMAGENET_COLOR_SQRT).max() < 0.035, m


def test_transforms_shapes_and_per_image_randomness():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 40, 40)
    assert pad(5)(x, g).shape == (6, 3, 50, 50)
    assert float(pad(5, 0.5)(x, g)[0, :, 0, 0].mean()) == 0.5
    j = jitter(8)(x.repeat(1, 1, 1, 1), g)
    assert j.shape == (6, 3, 32, 32)
    same = x[:1].expand(6, -1, -1, -1)
    outs = jitter(8)(same, g)
    assert len({tuple(o.flatten()[:5].tolist()) for o in outs}) > 1  # offsets differ per image
    ident = random_scale([1.0])(x, g)
    assert torch.allclose(ident, x, atol=1e-5)
    r90 = random_rotate([90])(x, g)
    assert torch.allclose(r90[:, :, 5:-5, 5:-5], torch.rot90(x, 1, (2, 3))[:, :, 5:-5, 5:-5],
                          atol=1e-4) or torch.allclose(
        r90[:, :, 5:-5, 5:-5], torch.rot90(x, -1, (2, 3))[:, :, 5:-5, 5:-5], atol=1e-4)
    ramp = torch.arange(40.0).expand(1, 3, 40, 40)  # value = column index
    zoom = random_scale([2.0])(ramp, g)  # magnified 2x about the centre: slope halves
    assert float(zoom[0, 0, 20, 30] - zoom[0, 0, 20, 10]) == pytest.approx(10.0, abs=0.01)
