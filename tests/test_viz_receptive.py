"""Receptive fields from the architecture: known values and the exact gradient support."""

from __future__ import annotations

import warnings
from functools import cache

import pytest
import torch

from branchlens.viz.receptive import receptive_field


@pytest.mark.parametrize("variant", ["bvlc_googlenet", "inception5h"])
def test_known_strides_and_sizes(variant):
    assert receptive_field(variant, "conv2d0").stride == 2
    assert receptive_field(variant, "mixed3a").stride == 8
    for layer in ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"):
        assert receptive_field(variant, layer).stride == 16
    assert receptive_field(variant, "mixed5b").stride == 32
    assert receptive_field(variant, "mixed3a").size == 59  # 27 (stem) + 4 * 8 (5x5 branch)
    assert receptive_field(variant, "mixed4a").size == 171
    assert receptive_field(variant, "mixed4a_1x1").size == 107  # branch alone: no 5x5 growth
    sizes = [receptive_field(variant, f"mixed4{c}").size for c in "abcde"]
    assert sizes == [171 + 64 * i for i in range(5)]  # each block's 5x5 adds 4 * 16


def test_caffe_and_tf_padding_shift_the_offset():
    assert receptive_field("bvlc_googlenet", "mixed4c").offset == 14
    assert receptive_field("inception5h", "mixed4c").offset == 15


@cache
def _random_model(variant):
    from branchlens.weights import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(variant, "random", seed=0)[0]


@pytest.mark.parametrize("variant", ["bvlc_googlenet", "inception5h"])
@pytest.mark.parametrize("layer,pos", [("conv2d0", (20, 30)), ("mixed3a", (12, 12)),
                                       ("mixed4a", (6, 7)), ("mixed4a_1x1", (6, 6))])
def test_box_equals_gradient_support_of_one_unit(variant, layer, pos):
    model = _random_model(variant)
    rf = receptive_field(variant, layer)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 100
    x.requires_grad_(True)
    y, z = pos
    model(x, [layer])[layer][0, :, y, z].sum().backward()
    nz = x.grad[0].abs().sum(0).nonzero()
    support = (int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1,
               int(nz[:, 1].max()) + 1)
    assert support == rf.box(y, z, 224)
