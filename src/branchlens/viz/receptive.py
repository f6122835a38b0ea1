"""Receptive fields of named layers, derived from the variant's architecture.

We walk the layer sequence the model actually runs (stem convs and pools with their kernel,
stride and padding; inside an inception block the branch with the largest receptive field) and
apply the standard recurrences. For unit (y, x) of a layer, its receptive field in the input is
centred at ``offset + stride * (y, x)`` and spans ``size`` pixels (before clipping to the image).
"""

from __future__ import annotations

from dataclasses import dataclass

from branchlens.model import InceptionV1, layer_names
from branchlens.variants import Variant, get_variant


@dataclass(frozen=True)
class Op:
    """One spatial operation: kernel, stride and padding on the leading (top/left) side."""

    name: str
    kernel: int
    stride: int
    pad: int


@dataclass(frozen=True)
class ReceptiveField:
    size: int  # pixels spanned by one unit
    stride: int  # input pixels between neighbouring units
    offset: float  # input coordinate of the centre of unit 0

    def center(self, y: int, x: int) -> tuple[float, float]:
        return self.offset + self.stride * y, self.offset + self.stride * x

    def box(self, y: int, x: int, image_size: int | None = None) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), half-open, optionally clipped to a square image."""
        cy, cx = self.center(y, x)
        half = self.size / 2
        t, l_, b, r = (round(cy - half + 0.5), round(cx - half + 0.5),
                       round(cy + half + 0.5), round(cx + half + 0.5))
        if image_size is not None:
            t, l_ = max(t, 0), max(l_, 0)
            b, r = min(b, image_size), min(r, image_size)
        return t, l_, b, r


def _conv_op(model: InceptionV1, name: str, leading_pad: int | None = None) -> Op:
    c = model.convs[name]
    pad = c.padding[0] if leading_pad is None else leading_pad
    return Op(name, c.kernel_size[0], c.stride[0], pad)


def _stem_pads(v: Variant) -> tuple[int, int]:
    """Leading padding of conv2d0 and of the stride-2 max-pools for this variant's conventions.

    Mirrors :class:`branchlens.model.InceptionV1`: Caffe pads conv2d0 by 3 on every side and
    uses ceil-mode pools (no leading pad); TF "SAME" pads conv2d0 by (2 before, 3 after) and the
    pools only after.
    """
    return (3, 0) if v.pool_style == "caffe" else (2, 0)


def layer_ops(variant: str | Variant, layer: str) -> list[Op]:
    """The chain of spatial ops from the input to ``layer`` along the largest-RF path."""
    v = get_variant(variant)
    model = InceptionV1(v).to("meta")
    names = layer_names(v)
    if layer not in names:
        raise KeyError(f"unknown layer {layer!r}")
    conv0_pad, pool_pad = _stem_pads(v)
    pool = (3, 2, pool_pad)
    ops: list[Op] = []
    stem = {"conv2d0": _conv_op(model, "conv2d0", conv0_pad), "maxpool0": Op("maxpool0", *pool),
            "conv2d1": _conv_op(model, "conv2d1"), "conv2d2": _conv_op(model, "conv2d2"),
            "maxpool1": Op("maxpool1", *pool), "maxpool4": Op("maxpool4", *pool),
            "maxpool10": Op("maxpool10", *pool)}
    blocks = {b.name for b in v.blocks}
    for name in names:
        base = name.removesuffix("_pre_relu")
        if base in stem and stem[base] not in ops:
            ops.append(stem[base])
        block, _, branch = base.partition("_")
        if block in blocks:
            ops.extend(_block_ops(model, block, branch, base == layer or name == layer))
            if base == layer or name == layer:
                return ops
        if name == layer:
            return ops
    return ops


def _block_ops(model: InceptionV1, block: str, branch: str, final: bool) -> list[Op]:
    """Ops of one block: a whole block contributes its largest-RF branch; a requested branch
    (or bottleneck) contributes its own path. Called once per named output of the block, so
    only the output that is requested (or the block itself) adds ops."""
    paths = {
        "1x1": [_conv_op(model, f"{block}_1x1")],
        "3x3_bottleneck": [_conv_op(model, f"{block}_3x3_bottleneck")],
        "3x3": [_conv_op(model, f"{block}_3x3_bottleneck"), _conv_op(model, f"{block}_3x3")],
        "5x5_bottleneck": [_conv_op(model, f"{block}_5x5_bottleneck")],
        "5x5": [_conv_op(model, f"{block}_5x5_bottleneck"), _conv_op(model, f"{block}_5x5")],
        "pool": [Op(f"{block}_maxpool", 3, 1, 1), _conv_op(model, f"{block}_pool")],
    }
    if branch:
        return paths[branch] if final else []
    return max((paths[b] for b in ("1x1", "3x3", "5x5", "pool")), key=_growth)


def _growth(path: list[Op]) -> int:
    return sum(op.kernel - 1 for op in path)


def receptive_field(variant: str | Variant, layer: str) -> ReceptiveField:
    """Size, stride and centre offset of ``layer``'s units in input pixels."""
    size, jump, start = 1, 1, 0.0
    for op in layer_ops(variant, layer):
        size += (op.kernel - 1) * jump
        start += ((op.kernel - 1) / 2 - op.pad) * jump
        jump *= op.stride
    return ReceptiveField(size, jump, start)
