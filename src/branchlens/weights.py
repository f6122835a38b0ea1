"""Find, verify and load pretrained weights into :class:`~branchlens.model.InceptionV1`.

Resolution order for a variant's weights: an explicit path, the variant's environment variable
(``BRANCHLENS_BVLC_WEIGHTS`` / ``BRANCHLENS_INCEPTION5H_WEIGHTS``), the user cache
(``$BRANCHLENS_CACHE`` or ``~/.cache/branchlens``), then a download where the variant has a URL.
Pickled ``.pth`` files are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from branchlens.model import InceptionV1
from branchlens.variants import Variant, get_variant


class WeightsError(RuntimeError):
    """Weights are missing, corrupt, of the wrong variant, or unsafe to load."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights a model was built with; goes into every artifact's metadata."""

    variant: str
    source: str  # "file" | "random"
    path: str | None
    sha256: str | None
    seed: int | None = None

    @property
    def random(self) -> bool:
        return self.source == "random"

    def to_dict(self) -> dict:
        return asdict(self) | {"random": self.random}


def cache_dir() -> Path:
    return Path(os.environ.get("BRANCHLENS_CACHE", Path.home() / ".cache" / "branchlens"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights_path(variant: str | Variant, weights: str | Path | None = None) -> Path:
    """Local path of the variant's weights, downloading into the cache if needed and possible."""
    v = get_variant(variant)
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsError(f"weights file not found: {p}")
        return p
    env = os.environ.get(v.weights.env_var)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise WeightsError(f"${v.weights.env_var} points to a missing file: {p}")
        return p
    cached = cache_dir() / v.weights.filename
    if cached.is_file():
        return cached
    if v.weights.url is None:
        raise WeightsError(
            f"no weights for {v.name}: pass --weights PATH (a {v.weights.fmt} file), set "
            f"${v.weights.env_var}, or put {v.weights.filename} in {cache_dir()}"
        )
    return _download(v.weights.url, cached, v)


def _download(url: str, dest: Path, v: Variant) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as e:
        os.unlink(tmp)
        raise WeightsError(
            f"could not download {v.name} weights from {url} ({e}). Offline? Download the file "
            f"elsewhere and pass --weights PATH/{v.weights.filename} or set ${v.weights.env_var}."
        ) from e
    if v.weights.sha256 and sha256_file(tmp) != v.weights.sha256:
        os.unlink(tmp)
        raise WeightsError(f"downloaded {url} does not match the pinned SHA-256")
    os.replace(tmp, dest)
    return dest


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or .pth file, with clear errors for corrupt or unsafe files."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own types for truncation/garbage
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from e
    sd = safe_torch_load(path)
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise WeightsError(f"{path} does not hold a flat state dict of tensors")
    return sd


_ADVICE = re.compile(r"weights.only|safe_globals|allowlist|trust", re.IGNORECASE)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; a file it refuses or cannot read is a
    :class:`WeightsError` that keeps torch's reason but never its advice to load the file anyway
    (``weights_only=False`` or allowlisting a global would run the file's code)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{path} could not be loaded with torch.load(weights_only=True): it is corrupt, "
            f"truncated, or contains code/objects other than tensors (refused for safety: "
            f"{_torch_reason(e)})") from e


def _torch_reason(e: Exception) -> str:
    """The "unsupported ..." part of torch's refusal, else its lines without any advice."""
    m = re.search(r"unsupported\b.*?(?=\.\s|\.?$)", str(e), re.IGNORECASE | re.MULTILINE)
    if m:
        return m.group(0)
    kept = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not _ADVICE.search(ln)]
    return "; ".join(kept) or type(e).__name__


def load_weights_into(model: InceptionV1, sd: dict[str, torch.Tensor], where: str = "") -> None:
    """Copy a source state dict into the model through the variant's name map; check everything."""
    v = model.variant
    missing, wrong = [], []
    ours = model.state_dict()
    new = {}
    for our_name, their_prefix in v.weight_names.items():
        module = "classifier" if our_name == "classifier" else f"convs.{our_name}"
        for part in ("weight", "bias"):
            key = f"{their_prefix}.{part}"
            target = ours[f"{module}.{part}"]
            if key not in sd:
                missing.append(key)
            elif tuple(sd[key].shape) != tuple(target.shape):
                wrong.append(f"{key}: {tuple(sd[key].shape)} != expected {tuple(target.shape)}")
            else:
                new[f"{module}.{part}"] = sd[key].float()
    if missing or wrong:
        raise WeightsError(
            f"weights{where} do not fit variant {v.name}: {len(missing)} missing "
            f"({missing[:4]}...), {len(wrong)} with wrong shape ({wrong[:4]})"
        )
    model.load_state_dict(new)


def load_model(
    variant: str | Variant = "bvlc_googlenet",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    verify: bool = True,
) -> tuple[InceptionV1, WeightsInfo]:
    """An eval-mode model with real weights, or seeded random ones when ``weights="random"``."""
    v = get_variant(variant)
    model = InceptionV1(v)
    if weights is not None and str(weights) == "random":
        warnings.warn(
            f"RANDOM WEIGHTS for {v.name} (seed {seed}): results say nothing about the real "
            "network; use only for smoke tests.", stacklevel=2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("weight"):
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                else:
                    p.zero_()
        info = WeightsInfo(v.name, "random", None, None, seed)
    else:
        path = resolve_weights_path(v, weights)
        digest = sha256_file(path)
        if verify and v.weights.sha256 and digest != v.weights.sha256:
            raise WeightsError(
                f"{path} has SHA-256 {digest}, expected {v.weights.sha256} for {v.name}: "
                "the file is corrupt or a different release (verify=False to load it anyway)")
        load_weights_into(model, read_state_dict(path), f" from {path}")
        info = WeightsInfo(v.name, "file", str(path), digest)
    return model.eval().to(device), info
