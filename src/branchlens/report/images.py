"""Images as ``data:`` URIs (the report is one file) and tiny inline SVG line charts.

Raster images are re-encoded at thumbnail size: a gallery of a few hundred latents with full-size
feature visualizations would be tens of megabytes. Each thumbnail is stored as PNG, or as JPEG
when that is much smaller (noisy feature visualizations and photo crops compress badly as PNG).
Files that do not decode are left out (the caller shows a note) so that every ``<img>`` in the
report decodes.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

SVG_MAX_BYTES = 1_500_000  # larger SVG figures fall back to their PNG sibling


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def svg_uri(path: Path) -> str | None:
    """An SVG file as a base64 data URI (an ``<img>`` source: its scripts never run)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"<svg" not in data[:4096]:
        return None
    return _b64(data, "image/svg+xml")


def raster_uri(path: Path, max_w: int = 0, max_h: int = 0) -> str | None:
    """A raster image re-encoded (fit into max_w × max_h when given) as a data URI, or None."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            img = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable file is simply left out
        return None
    if max_w or max_h:
        img.thumbnail((max_w or 10**6, max_h or 10**6))
    png = io.BytesIO()
    img.save(png, format="PNG", optimize=True)
    if img.mode == "RGB":
        jpg = io.BytesIO()
        img.save(jpg, format="JPEG", quality=88)
        if jpg.tell() < 0.6 * png.tell():
            return _b64(jpg.getvalue(), "image/jpeg")
    return _b64(png.getvalue(), "image/png")


def figure_uri(stem: Path) -> str | None:
    """A matplotlib figure saved as ``stem.svg`` and/or ``stem.png``: SVG when small enough."""
    svg, png = stem.with_suffix(".svg"), stem.with_suffix(".png")
    if svg.is_file() and svg.stat().st_size <= SVG_MAX_BYTES:
        uri = svg_uri(svg)
        if uri:
            return uri
    if png.is_file():
        return raster_uri(png)
    if svg.is_file():
        return svg_uri(svg)
    return None


def image_uri(path: Path, max_w: int = 0, max_h: int = 0) -> str | None:
    return svg_uri(path) if path.suffix.lower() == ".svg" else raster_uri(path, max_w, max_h)


def sparkline(xs: list[float], ys: list[float], title: str, width: int = 220,
              height: int = 70, log: bool = False) -> str:
    """A small inline SVG line chart (used when a layer has metrics but no curves PNG)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=False)
           if isinstance(y, int | float) and math.isfinite(y) and (not log or y > 0)]
    head = (f'<svg class="spark" width="{width}" height="{height}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>')
    if len(pts) < 2:
        return head + f'<text x="4" y="14">{html.escape(title)}: no data</text></svg>'
    tx = [p[0] for p in pts]
    ty = [math.log10(p[1]) if log else p[1] for p in pts]
    x0, x1, y0, y1 = min(tx), max(tx), min(ty), max(ty)
    sx = (width - 8) / ((x1 - x0) or 1)
    sy = (height - 24) / ((y1 - y0) or 1)
    path = " ".join(f"{4 + (x - x0) * sx:.1f},{height - 4 - (y - y0) * sy:.1f}"
                    for x, y in zip(tx, ty, strict=True))
    last = pts[-1][1]
    label = f"{title}: {last:.4g}" + (" (log)" if log else "")
    return (head + f'<text x="4" y="12">{html.escape(label)}</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/></svg>')
