"""InceptionV1 model variants as data.

Everything downstream (model building, harvesting, branch statistics, receptive fields) reads
layer order, branch widths and preprocessing from here; no other module hard-codes channel
indices. Two variants ship: BVLC GoogLeNet (Caffe model zoo) and Lucid's ``inception5h`` (the
model of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BRANCHES: tuple[str, ...] = ("1x1", "3x3", "5x5", "pool")
BLOCK_NAMES: tuple[str, ...] = (
    "mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a",
    "mixed5b",
)


@dataclass(frozen=True)
class Block:
    """One inception block: output widths of the four branches and the two bottlenecks."""

    name: str
    in_channels: int
    b1x1: int
    b3x3_bottleneck: int
    b3x3: int
    b5x5_bottleneck: int
    b5x5: int
    pool: int

    @property
    def widths(self) -> dict[str, int]:
        return {"1x1": self.b1x1, "3x3": self.b3x3, "5x5": self.b5x5, "pool": self.pool}

    @property
    def out_channels(self) -> int:
        return self.b1x1 + self.b3x3 + self.b5x5 + self.pool


@dataclass(frozen=True)
class Preprocessing:
    """How a [0, 1] RGB image becomes model input: optional BGR swap, scale, mean subtraction."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]  # in model channel order, after scaling
    resize: int = 256
    crop: int = 224


@dataclass(frozen=True)
class WeightSource:
    filename: str
    sha256: str | None
    url: str | None
    fmt: str  # "safetensors" | "pth"
    env_var: str


@dataclass(frozen=True)
class Variant:
    """A complete description of one InceptionV1 flavour."""

    name: str
    description: str
    blocks: tuple[Block, ...]
    num_classes: int
    preprocessing: Preprocessing
    # Pooling: Caffe uses ceil-mode pools; TF ("SAME") pads right/bottom with -inf explicitly.
    pool_style: str  # "caffe" | "tf"
    lrn_size: int
    lrn_alpha: float
    lrn_beta: float
    lrn_k: float
    weights: WeightSource
    # Our uniform conv names -> the source's tensor-name prefix.
    weight_names: dict[str, str] = field(repr=False, default_factory=dict)
    classes_file: str | None = None

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        names = [b.name for b in self.blocks]
        raise KeyError(f"{self.name} has no block {name!r}; blocks: {names}")


def _blocks(rows: list[tuple]) -> tuple[Block, ...]:
    blocks, in_ch = [], 192
    for name, *w in rows:
        b = Block(name, in_ch, *w)
        blocks.append(b)
        in_ch = b.out_channels
    return tuple(blocks)


STEM_CONVS = ("conv2d0", "conv2d1", "conv2d2")
CONV_SUFFIXES = ("1x1", "3x3_bottleneck", "3x3", "5x5_bottleneck", "5x5", "pool")


def _bvlc_names(blocks: tuple[Block, ...]) -> dict[str, str]:
    names = {"conv2d0": "conv1/7x7_s2", "conv2d1": "conv2/3x3_reduce", "conv2d2": "conv2/3x3",
             "classifier": "loss3/classifier"}
    caffe = {"1x1": "1x1", "3x3_bottleneck": "3x3_reduce", "3x3": "3x3",
             "5x5_bottleneck": "5x5_reduce", "5x5": "5x5", "pool": "pool_proj"}
    for b in blocks:
        for ours, theirs in caffe.items():
            names[f"{b.name}_{ours}"] = f"inception_{b.name.removeprefix('mixed')}/{theirs}"
    return names


def _lucid_names(blocks: tuple[Block, ...]) -> dict[str, str]:
    names = {c: f"{c}_pre_relu_conv" for c in STEM_CONVS}
    names["classifier"] = "softmax2_pre_activation_matmul"
    for b in blocks:
        for s in CONV_SUFFIXES:
            theirs = "pool_reduce" if s == "pool" else s
            names[f"{b.name}_{s}"] = f"{b.name}_{theirs}_pre_relu_conv"
    return names


_BVLC_BLOCKS = _blocks([
    ("mixed3a", 64, 96, 128, 16, 32, 32),
    ("mixed3b", 128, 128, 192, 32, 96, 64),
    ("mixed4a", 192, 96, 208, 16, 48, 64),
    ("mixed4b", 160, 112, 224, 24, 64, 64),
    ("mixed4c", 128, 128, 256, 24, 64, 64),
    ("mixed4d", 112, 144, 288, 32, 64, 64),
    ("mixed4e", 256, 160, 320, 32, 128, 128),
    ("mixed5a", 256, 160, 320, 32, 128, 128),
    ("mixed5b", 384, 192, 384, 48, 128, 128),
])

_LUCID_BLOCKS = _blocks([
    ("mixed3a", 64, 96, 128, 16, 32, 32),
    ("mixed3b", 128, 128, 192, 32, 96, 64),
    ("mixed4a", 192, 96, 204, 16, 48, 64),
    ("mixed4b", 160, 112, 224, 24, 64, 64),
    ("mixed4c", 128, 128, 256, 24, 64, 64),
    ("mixed4d", 112, 144, 288, 32, 64, 64),
    ("mixed4e", 256, 160, 320, 32, 128, 128),
    ("mixed5a", 256, 160, 320, 48, 128, 128),
    ("mixed5b", 384, 192, 384, 48, 128, 128),
])

BVLC_GOOGLENET = Variant(
    name="bvlc_googlenet",
    description="BVLC GoogLeNet (Caffe model zoo), ImageNet-1k, BGR 0-255 minus mean",
    blocks=_BVLC_BLOCKS,
    num_classes=1000,
    preprocessing=Preprocessing(bgr=True, scale=255.0, mean=(104.0, 117.0, 123.0)),
    pool_style="caffe",
    lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=1.0,
    weights=WeightSource(
        filename="bvlc_googlenet.safetensors",
        sha256="53c37410114362fa89c489456178ca15d63dfadc61bb6f6640d0fa83626cdd01",
        url=None,  # no public safetensors URL; pass --weights or set the env var
        fmt="safetensors",
        env_var="BRANCHLENS_BVLC_WEIGHTS",
    ),
    weight_names=_bvlc_names(_BVLC_BLOCKS),
    classes_file="imagenet_classes.txt",
)

INCEPTION5H = Variant(
    name="inception5h",
    description="Lucid/Lucent inception5h (the paper's model), 1008 classes, RGB x*255-117",
    blocks=_LUCID_BLOCKS,
    num_classes=1008,
    preprocessing=Preprocessing(bgr=False, scale=255.0, mean=(117.0, 117.0, 117.0)),
    pool_style="tf",
    lrn_size=9, lrn_alpha=9.99999974738e-05, lrn_beta=0.5, lrn_k=1.0,
    weights=WeightSource(
        filename="inception5h.pth",
        sha256=None,  # no published digest: the file's sha256 is recorded in every provenance
        url="https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth",
        fmt="pth",
        env_var="BRANCHLENS_INCEPTION5H_WEIGHTS",
    ),
    weight_names=_lucid_names(_LUCID_BLOCKS),
    classes_file=None,
)

VARIANTS: dict[str, Variant] = {v.name: v for v in (BVLC_GOOGLENET, INCEPTION5H)}
DEFAULT_VARIANT = "bvlc_googlenet"


def get_variant(variant: str | Variant) -> Variant:
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except KeyError:
        raise KeyError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}") from None


def branch_slices(variant: str | Variant, layer: str) -> dict[str, slice]:
    """Ordered {branch: slice} of a block's concatenated output (1x1 | 3x3 | 5x5 | pool).

    A single-branch layer name (``mixed4c_5x5``) gives that branch alone at ``0:width``.
    """
    v = get_variant(variant)
    block_name, _, branch = layer.partition("_")
    widths = v.block(block_name).widths
    if branch:
        if branch not in widths:
            raise KeyError(f"{layer!r} is not a block or a branch output")
        return {branch: slice(0, widths[branch])}
    out, start = {}, 0
    for b in BRANCHES:
        out[b] = slice(start, start + widths[b])
        start += widths[b]
    return out


def layer_channels(variant: str | Variant, layer: str) -> int:
    """Channel count of a block output or a single branch output."""
    return sum(s.stop - s.start for s in branch_slices(variant, layer).values())


def class_names(variant: str | Variant) -> list[str]:
    """Human-readable class names; generic ones when the variant ships none."""
    from importlib.resources import files

    v = get_variant(variant)
    if v.classes_file is None:
        return [f"class_{i}" for i in range(v.num_classes)]
    lines = (files("branchlens") / "resources" / v.classes_file).read_text().splitlines()
    return [ln.split(" ", 1)[1].split(",")[0] if " " in ln else ln for ln in lines if ln.strip()]


LABEL_CLASSES = "imagenet_classes.txt"  # ILSVRC-2012 order: the space every image label is in


def label_wnids() -> list[str]:
    """The wnids of ILSVRC-2012 classes 0..999: image labels are indices into this list for
    every variant, whatever the order (or size) of the model's own classifier head, so the
    category tests work on inception5h (1008 outputs, its own order) too."""
    from importlib.resources import files

    lines = (files("branchlens") / "resources" / LABEL_CLASSES).read_text().splitlines()
    return [ln.split(" ", 1)[0] for ln in lines if ln.strip()]


def label_synonyms() -> list[list[str]]:
    """The ImageNet synonym lists of ILSVRC classes 0..999 as the WordNet lines give them, in
    their case (``['Cardigan', 'Cardigan Welsh corgi']`` is 264, ``['cardigan']`` 474); the
    first name is the one torchvision and most datasets use."""
    from importlib.resources import files

    lines = (files("branchlens") / "resources" / LABEL_CLASSES).read_text().splitlines()
    return [[n.strip() for n in ln.partition(" ")[2].split(",")] for ln in lines if ln.strip()]


def head_is_ilsvrc(variant: str | Variant) -> bool:
    """Whether the model's output i is ILSVRC class i (so labels can score predictions)."""
    return get_variant(variant).classes_file == LABEL_CLASSES


def class_wnids(variant: str | Variant) -> list[str] | None:
    """The wnids of the model head's outputs (None when the variant ships none)."""
    from importlib.resources import files

    v = get_variant(variant)
    if v.classes_file is None:
        return None
    lines = (files("branchlens") / "resources" / v.classes_file).read_text().splitlines()
    return [ln.split(" ", 1)[0] for ln in lines if ln.strip()]
