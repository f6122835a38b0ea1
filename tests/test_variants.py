import pytest

from branchlens.variants import (
    BRANCHES,
    VARIANTS,
    branch_slices,
    class_names,
    get_variant,
    layer_channels,
)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_slices_tile_each_block(variant):
    v = get_variant(variant)
    for b in v.blocks:
        sl = branch_slices(v, b.name)
        assert list(sl) == list(BRANCHES)
        starts = [s.start for s in sl.values()]
        stops = [s.stop for s in sl.values()]
        assert starts[0] == 0 and stops[-1] == b.out_channels
        assert starts[1:] == stops[:-1]  # contiguous, no gap, no overlap


def test_known_widths_from_the_references():
    assert layer_channels("bvlc_googlenet", "mixed4a") == 512
    assert layer_channels("inception5h", "mixed4a") == 508
    assert branch_slices("inception5h", "mixed4c")["5x5"] == slice(384, 448)
    assert branch_slices("bvlc_googlenet", "mixed4e")["pool"] == slice(704, 832)
    assert branch_slices("bvlc_googlenet", "mixed4d_5x5") == {"5x5": slice(0, 64)}
    assert layer_channels("inception5h", "mixed4d") == 528


def test_blocks_chain_channels():
    for v in VARIANTS.values():
        for prev, nxt in zip(v.blocks, v.blocks[1:], strict=False):
            assert nxt.in_channels == prev.out_channels


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match="unknown variant"):
        get_variant("resnet")
    with pytest.raises(KeyError, match="no block"):
        branch_slices("bvlc_googlenet", "mixed9z")
    with pytest.raises(KeyError, match="not a block or a branch"):
        branch_slices("bvlc_googlenet", "mixed4a_7x7")


def test_class_names():
    names = class_names("bvlc_googlenet")
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert len(class_names("inception5h")) == 1008
