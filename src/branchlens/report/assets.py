"""The latent browser's files: data scripts with their number formats, and images copied once.

``fetch()`` of JSON is refused on ``file://``, so each data file is a script handing its object
to the page (``BL.table(...)``); numbers are rounded to what the page shows, so files stay small.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

MAX_IMAGE_BYTES = 16 * 2**20  # an example image is a ~20 kB JPEG; a huge file is left out


def rounded(a: np.ndarray, digits: int) -> list:
    """A column as a JSON list, ``digits`` decimals, NaN -> null."""
    r = np.round(np.asarray(a, dtype=np.float64), digits)
    return [None if not math.isfinite(x) else x for x in r.tolist()]


def sig_round(a: np.ndarray, digits: int = 3) -> np.ndarray:
    """``a`` rounded to ``digits`` significant digits, vectorised (p- and q-values span many
    decades). Dividing or multiplying by an exact power of ten keeps each value the double
    nearest its short decimal, so JSON writes it short."""
    a = np.asarray(a, dtype=np.float64)
    out = a.copy()
    ok = np.isfinite(a) & (a != 0)
    v = a[ok]
    e = np.floor(np.log10(np.abs(v))).astype(np.int64) - (digits - 1)
    r = v.copy()
    up, down = e >= 0, (e < 0) & (e > -300)
    r[up] = np.round(v[up] / 10.0 ** e[up]) * 10.0 ** e[up]
    r[down] = np.round(v[down] * 10.0 ** -e[down]) / 10.0 ** -e[down]
    out[ok] = r
    return out


def nulls(x: list) -> list:
    """NaN and infinities -> null (JSON has neither)."""
    return [None if v != v or v in (math.inf, -math.inf) else v for v in x]


def sig_list(a: np.ndarray, digits: int = 3) -> list:
    """A column as a JSON list, ``digits`` significant digits, NaN -> null."""
    return nulls(sig_round(a, digits).tolist())


def ints(a: np.ndarray, fill: int = -1) -> list[int]:
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), a, fill).astype(np.int64).tolist()


def write_script(path: Path, call: str, *args: Any) -> int:
    """Write ``BL.call(arg, ...);`` (JSON arguments, ASCII only); returns the size in bytes."""
    text = f"BL.{call}(" + ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=True,
                                               allow_nan=False) for a in args) + ");\n"
    path.write_text(text, encoding="ascii")
    return len(text)


def short(x: Any) -> float | None:
    """One number, 3 significant digits (None when it is not a finite number)."""
    return float(f"{x:.3g}") if isinstance(x, int | float) and math.isfinite(x) else None


class Assets:
    """Copies images into ``assets/img`` once each and hands out their relative URLs."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[Path, str | None] = {}

    def thumbnail(self, src: Path, name: str, px: int) -> str | None:
        if src in self.done:
            return self.done[src]
        from PIL import Image

        try:
            with Image.open(src) as im:
                im.load()
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - an undecodable file is left out (the page says so)
            self.done[src] = None
            return None
        img.thumbnail((px, px))
        out = self.root / "img" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, format="PNG", optimize=True)
        self.done[src] = f"assets/img/{out.name}"
        return self.done[src]

    def unique(self, src: Path, prefix: str) -> str | None:
        """Copy an image under a name from its content (the same held-out image in five
        layers' galleries is one file); None when it does not decode."""
        import hashlib
        import io

        from PIL import Image

        if src in self.done:
            return self.done[src]
        try:
            if src.stat().st_size > MAX_IMAGE_BYTES:
                raise ValueError("too large for an example image")
            data = src.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
                ext = {"JPEG": ".jpg", "PNG": ".png"}.get(im.format or "")
        except Exception:  # noqa: BLE001 - an unreadable file is left out (the page says so)
            ext = None
        if ext is None:
            self.done[src] = None
            return None
        name = f"{prefix}{hashlib.sha256(data).hexdigest()[:20]}{ext}"
        out = self.root / "img" / name
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        self.done[src] = f"assets/img/{name}"
        return self.done[src]

    def copy(self, src: Path, name: str) -> str | None:
        if src in self.done:
            return self.done[src]
        out = self.root / "img" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, out)
        except OSError:
            self.done[src] = None
            return None
        self.done[src] = f"assets/img/{name}"
        return self.done[src]
