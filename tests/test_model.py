import pytest
import torch

from branchlens.model import InceptionV1, layer_names, output_shape
from branchlens.variants import VARIANTS, get_variant

SPATIAL = {"mixed3": 28, "mixed4": 14, "mixed5": 7}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_named_output_has_the_documented_shape(variant):
    v = get_variant(variant)
    m = InceptionV1(v).eval()
    names = layer_names(v)
    with torch.no_grad():
        out = m(torch.randn(2, 3, 224, 224), names)
    assert set(out) == set(names)
    assert out["conv2d0"].shape == (2, 64, 112, 112)
    assert out["maxpool0"].shape == (2, 64, 56, 56)
    assert out["maxpool1"].shape == (2, 192, 28, 28)
    for b in v.blocks:
        hw = SPATIAL[b.name[:6]]
        assert out[b.name].shape == (2, b.out_channels, hw, hw)
        for branch, w in b.widths.items():
            assert out[f"{b.name}_{branch}"].shape == (2, w, hw, hw)
            assert out[f"{b.name}_{branch}_pre_relu"].shape == (2, w, hw, hw)
        assert out[f"{b.name}_3x3_bottleneck"].shape[1] == b.b3x3_bottleneck
        assert out[f"{b.name}_5x5_bottleneck"].shape[1] == b.b5x5_bottleneck
        # the block output is exactly the concatenation of its branches, in slice order
        cat = torch.cat([out[f"{b.name}_{br}"] for br in b.widths], dim=1)
        assert torch.equal(cat, out[b.name])
    assert out["logits"].shape == (2, v.num_classes)
    assert (out["mixed4c"] >= 0).all()
    assert (out["mixed4c_1x1_pre_relu"] < 0).any()


def test_default_forward_returns_logits():
    m = InceptionV1("bvlc_googlenet").eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_early_exit_skips_later_modules():
    m = InceptionV1("bvlc_googlenet").eval()
    called = []
    for name, conv in m.convs.items():
        conv.register_forward_hook(lambda mod, i, o, name=name: called.append(name))
    m.classifier.register_forward_hook(lambda *a: called.append("classifier"))
    with torch.no_grad():
        out = m(torch.randn(1, 3, 224, 224), ["mixed4a", "mixed3b_5x5"])
    assert set(out) == {"mixed4a", "mixed3b_5x5"}
    assert "mixed4a_pool" in called
    assert not any(c.startswith(("mixed4b", "mixed4e", "mixed5")) for c in called)
    assert "classifier" not in called


def test_unknown_layer_is_a_clear_error():
    m = InceptionV1("bvlc_googlenet")
    with pytest.raises(KeyError, match="unknown layer"):
        m(torch.randn(1, 3, 224, 224), ["mixed4z"])


def test_output_shape_helper():
    assert output_shape("bvlc_googlenet", "mixed4e") == (832, 14, 14)
    assert output_shape("inception5h", "mixed4a") == (508, 14, 14)
