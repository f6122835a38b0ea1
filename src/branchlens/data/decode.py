"""Decoding and preprocessing: one record to a model input, or to a counted skip reason.

:func:`decode_one` turns any record into a model input or a skip reason, never an exception, so
one bad file cannot end a long harvest. Every source kind (folders, lists, ``hf:``, ``wds:``)
decodes through here.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from branchlens.data.records import FLIP_VIEW, BadImage, RawRecord
from branchlens.variants import Preprocessing, Variant, get_variant

MAX_PIXELS = 89_478_485  # PIL's own default bomb limit, made explicit and configurable
MAX_FILE_BYTES = 256 * 2**20  # no real image file is larger; /dev/zero-like files are refused


def decode_image(payload: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any supported payload -> an RGB PIL image with EXIF orientation applied.

    Raises :class:`BadImage` with a reason of ``empty``, ``unreadable``, ``not_image``,
    ``truncated``, ``too_large``, ``not_regular_file`` or ``missing``.
    """
    if callable(payload):
        payload = payload()
    if isinstance(payload, Image.Image):
        img = payload
    else:
        if isinstance(payload, (str, Path)):
            data = _read_file(Path(payload))
        else:
            data = bytes(payload)
        if not data:
            raise BadImage("empty", "zero bytes")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadImage("too_large", str(e)) from e
        except Exception as e:
            raise BadImage("not_image", str(e)) from e
    if img.width * img.height > max_pixels:
        raise BadImage("too_large", f"{img.width}x{img.height} > {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or "broken data" in msg else "unreadable"
        raise BadImage(reason, msg) from e
    return img


def _read_file(p: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_FILE_BYTES`. Anything else (a FIFO,
    a device, a folder, also behind a symlink) is refused unopened: reading it could hang or
    fill the memory."""
    try:
        st = os.stat(p)  # follows symlinks
    except FileNotFoundError as e:
        raise BadImage("missing", str(p)) from e
    except OSError as e:
        raise BadImage("unreadable", f"{p}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_regular_file", str(p))
    if st.st_size > MAX_FILE_BYTES:
        raise BadImage("too_large", f"{p}: {st.st_size} bytes > {MAX_FILE_BYTES}")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # a file that grew since the stat stays capped
    except FileNotFoundError as e:
        raise BadImage("missing", str(p)) from e
    except OSError as e:
        raise BadImage("unreadable", f"{p}: {e}") from e
    if len(data) > MAX_FILE_BYTES:
        raise BadImage("too_large", f"{p}: more than {MAX_FILE_BYTES} bytes")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB; alpha is composited on white, 16-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        a = a / (hi if hi > 0 else 1.0) * 255.0
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


# -- preprocessing ------------------------------------------------------------------------------

def resize_center_crop(img: Image.Image, resize: int = 256, crop: int = 224) -> Image.Image:
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float tensor [3, H, W] in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, variant: str | Variant, paper_compat: bool = False) -> torch.Tensor:
    """[0, 1] RGB (..., 3, H, W) -> model input for the variant.

    ``paper_compat`` reproduces the paper's harvest bug: [0, 1] RGB fed to a model that expects
    ``x*255 - 117`` (only meaningful for ``inception5h``).
    """
    if paper_compat:
        return x
    p: Preprocessing = get_variant(variant).preprocessing
    if p.bgr:
        x = x.flip(-3)
    mean = torch.tensor(p.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * p.scale - mean


def preprocess(
    img: Image.Image, variant: str | Variant, paper_compat: bool = False
) -> torch.Tensor:
    p = get_variant(variant).preprocessing
    return normalize(to_unit_tensor(resize_center_crop(img, p.resize, p.crop)), variant,
                     paper_compat)


def flipped(rec: RawRecord) -> RawRecord:
    """The horizontal mirror of a record as a second view (``<id>#flip``), decoded lazily."""
    return RawRecord(f"{rec.image_id}{FLIP_VIEW}", rec.label, _Mirrored(rec.payload))


@dataclass
class _Mirrored:
    payload: Any

    def __call__(self) -> Image.Image:
        return ImageOps.mirror(decode_image(self.payload))


def decode_one(i: int, rec: RawRecord, variant: Variant, paper_compat: bool,
               max_pixels: int) -> tuple:
    """``(i, id, label, input, None)`` or ``(i, id, label, None, skip reason)``: one record
    decoded and preprocessed, every failure turned into a counted reason."""
    try:
        img = decode_image(rec.payload, max_pixels)
        x = preprocess(img, variant, paper_compat)
        if not torch.isfinite(x).all():
            raise BadImage("non_finite", rec.image_id)
        return i, rec.image_id, rec.label, x, None
    except BadImage as e:
        return i, rec.image_id, rec.label, None, e.reason
    except Exception as e:  # a decoder bug on one file must not end a long harvest
        return i, rec.image_id, rec.label, None, f"error:{type(e).__name__}"
