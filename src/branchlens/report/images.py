"""Figures as files next to the page (loaded lazily), and tiny inline SVG line charts.

The report is a folder, so figures are copied into ``assets/img`` and referenced relatively
instead of inlined as ``data:`` URIs: the page stays small and the browser loads a figure only
when it scrolls into view. PNG is preferred over SVG (matplotlib SVGs of thousands of latents
are megabytes); an SVG is only used when it is the only file, and as an ``<img>`` its scripts
never run.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any


def _check_raster(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any undecodable file is simply left out
        return False


def image_src(ctx: Any, path: Path) -> str | None:
    """Copy ``path`` into the report's assets; its relative URL, or None if it is unreadable."""
    if ctx.assets is None:
        return None
    if path.suffix.lower() == ".svg":
        try:
            ok = b"<svg" in path.read_bytes()[:4096]
        except OSError:
            ok = False
    else:
        ok = _check_raster(path)
    if not ok:
        return None
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in path.stem)[:60]
    return ctx.assets.copy(path, f"fig{len(ctx.assets.done)}_{stem}{path.suffix.lower()}")


def figure_src(ctx: Any, stem: Path) -> str | None:
    """A matplotlib figure saved as ``stem.png`` and/or ``stem.svg``: the PNG when readable."""
    for p in (stem.with_suffix(".png"), stem.with_suffix(".svg")):
        if p.is_file():
            src = image_src(ctx, p)
            if src:
                return src
    return None


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
