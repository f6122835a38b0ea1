"""InceptionV1 built from a :class:`~branchlens.variants.Variant`, with every tensor addressable.

``model(x, layers=[...])`` returns a dict of the requested named tensors and stops after the
deepest one, so harvesting mixed4a-4e never pays for mixed5 or the classifier. Names are the same
for every variant:

- stem: ``conv2d0``, ``maxpool0``, ``localresponsenorm0``, ``conv2d1``, ``conv2d2``,
  ``localresponsenorm1``, ``maxpool1``
- blocks: ``mixed3a`` ... ``mixed5b`` (concatenated output), with ``maxpool4`` before mixed4a and
  ``maxpool10`` before mixed5a
- inside a block: ``mixed4c_1x1``, ``mixed4c_3x3``, ``mixed4c_5x5``, ``mixed4c_pool`` (branch
  outputs), ``mixed4c_3x3_bottleneck``, ``mixed4c_5x5_bottleneck``
- every conv also as ``<name>_pre_relu``
- head: ``avgpool0``, ``logits``
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from branchlens.variants import CONV_SUFFIXES, Block, Variant, get_variant

_STAGE_POOLS = {"mixed4a": "maxpool4", "mixed5a": "maxpool10"}


def layer_names(variant: str | Variant) -> list[str]:
    """Every named output in forward order (the order early exit relies on)."""
    v = get_variant(variant)
    names = ["conv2d0_pre_relu", "conv2d0", "maxpool0", "localresponsenorm0",
             "conv2d1_pre_relu", "conv2d1", "conv2d2_pre_relu", "conv2d2",
             "localresponsenorm1", "maxpool1"]
    for b in v.blocks:
        if b.name in _STAGE_POOLS:
            names.append(_STAGE_POOLS[b.name])
        for s in CONV_SUFFIXES:
            names += [f"{b.name}_{s}_pre_relu", f"{b.name}_{s}"]
        names.append(b.name)
    return names + ["avgpool0", "logits"]


Edit = Callable[[torch.Tensor], torch.Tensor]


class _Outputs:
    """Collects requested tensors, applies edits, and tells the forward pass when it may stop.

    An edit replaces a named tensor by ``edit(tensor)`` for the rest of the pass (what
    interventions use); the recorded tensor is the edited one."""

    def __init__(self, wanted: set[str], edits: Mapping[str, Edit] | None = None):
        self.wanted = set(wanted)
        self.edits = dict(edits or {})
        self.got: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name in self.edits:
            t = self.edits[name](t)
        if name in self.wanted:
            self.got[name] = t
            self.wanted.discard(name)
        return t

    @property
    def done(self) -> bool:
        return not self.wanted


class InceptionV1(nn.Module):
    # The nonlinearity after every conv; feature visualization swaps in a redirected-gradient
    # ReLU for its first steps (viz/relu.py). The forward value is always the plain ReLU.
    relu_fn = staticmethod(F.relu)

    def __init__(self, variant: str | Variant = "bvlc_googlenet"):
        super().__init__()
        self.variant = get_variant(variant)
        convs: dict[str, nn.Conv2d] = {
            "conv2d0": nn.Conv2d(3, 64, 7, stride=2),
            "conv2d1": nn.Conv2d(64, 64, 1),
            "conv2d2": nn.Conv2d(64, 192, 3, padding=1),
        }
        for b in self.variant.blocks:
            convs.update(_block_convs(b))
        self.convs = nn.ModuleDict(convs)
        last = self.variant.blocks[-1].out_channels
        self.classifier = nn.Linear(last, self.variant.num_classes)
        self._names = layer_names(self.variant)

    # -- pooling/normalisation conventions of the variant -------------------------------------
    def _pool_s2(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant.pool_style == "caffe":
            return F.max_pool2d(x, 3, 2, ceil_mode=True)
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variant
        return F.local_response_norm(x, v.lrn_size, v.lrn_alpha, v.lrn_beta, v.lrn_k)

    def _conv(self, name: str, x: torch.Tensor, out: _Outputs) -> torch.Tensor:
        pre = out(f"{name}_pre_relu", self.convs[name](x))
        return out(name, self.relu_fn(pre))

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, layers: list[str] | tuple[str, ...] | None = None,
        edits: Mapping[str, Edit] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits when ``layers`` is None, else ``{name: tensor}`` for the requested names.

        ``edits`` maps a name to a function that replaces that tensor in the pass."""
        if layers is None:
            return self.forward(x, ["logits"], edits)["logits"]
        unknown = [n for n in [*layers, *(edits or {})] if n not in self._names]
        if unknown:
            raise KeyError(f"unknown layer(s) {unknown}; see branchlens.model.layer_names()")
        out = _Outputs(set(layers), edits)

        if self.variant.pool_style == "caffe":
            x = F.pad(x, (3, 3, 3, 3))
        else:  # TF "SAME" for a stride-2 7x7 conv on an even input
            x = F.pad(x, (2, 3, 2, 3))
        x = self._conv("conv2d0", x, out)
        x = out("maxpool0", self._pool_s2(x))
        x = out("localresponsenorm0", self._lrn(x))
        x = self._conv("conv2d1", x, out)
        x = self._conv("conv2d2", x, out)
        x = out("localresponsenorm1", self._lrn(x))
        x = out("maxpool1", self._pool_s2(x))
        if out.done:
            return out.got

        for b in self.variant.blocks:
            if b.name in _STAGE_POOLS:
                x = out(_STAGE_POOLS[b.name], self._pool_s2(x))
            x = self._block(b, x, out)
            if out.done:
                return out.got

        x = out("avgpool0", torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        out("logits", self.classifier(x))
        return out.got

    def forward_between(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Block output ``dst`` (or ``"logits"``) computed from block output ``src`` (e.g.
        mixed4a → mixed4c) through the model's own blocks and pools: what circuits
        differentiate through, and how interventions reuse one prefix for many edits."""
        blocks = {b.name: b for b in self.variant.blocks}
        if src not in blocks or (dst not in blocks and dst != "logits"):
            raise KeyError(f"need block outputs (e.g. mixed4a) or 'logits'; got {src!r} -> "
                           f"{dst!r}")
        i, j = self._names.index(src), self._names.index(dst)
        if j <= i:
            raise ValueError(f"{dst} is not downstream of {src}")
        sink = _Outputs(set())
        for name in self._names[i + 1:j + 1]:
            if name.startswith("maxpool"):
                x = self._pool_s2(x)
            elif name in blocks:
                x = self._block(blocks[name], x, sink)
            elif name == "logits":
                x = self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return x

    def _block(self, b: Block, x: torch.Tensor, out: _Outputs) -> torch.Tensor:
        n = b.name
        y1 = self._conv(f"{n}_1x1", x, out)
        y3 = self._conv(f"{n}_3x3", self._conv(f"{n}_3x3_bottleneck", x, out), out)
        y5 = self._conv(f"{n}_5x5", self._conv(f"{n}_5x5_bottleneck", x, out), out)
        yp = self._conv(f"{n}_pool", F.max_pool2d(x, 3, 1, padding=1), out)
        return out(n, torch.cat([y1, y3, y5, yp], dim=1))


def _block_convs(b: Block) -> dict[str, nn.Conv2d]:
    n = b.name
    return {
        f"{n}_1x1": nn.Conv2d(b.in_channels, b.b1x1, 1),
        f"{n}_3x3_bottleneck": nn.Conv2d(b.in_channels, b.b3x3_bottleneck, 1),
        f"{n}_3x3": nn.Conv2d(b.b3x3_bottleneck, b.b3x3, 3, padding=1),
        f"{n}_5x5_bottleneck": nn.Conv2d(b.in_channels, b.b5x5_bottleneck, 1),
        f"{n}_5x5": nn.Conv2d(b.b5x5_bottleneck, b.b5x5, 5, padding=2),
        f"{n}_pool": nn.Conv2d(b.in_channels, b.pool, 1),
    }


def output_shape(variant: str | Variant, layer: str, size: int = 224) -> tuple[int, int, int]:
    """(C, H, W) of a named output for a square input, computed by a meta-device forward."""
    m = InceptionV1(variant).to("meta")
    with torch.no_grad():
        t = m(torch.empty(1, 3, size, size, device="meta"), [layer])[layer]
    return tuple(t.shape[1:])  # type: ignore[return-value]
