"""Open a report in real headless Chromium (Playwright, system browser): checks and screenshots.

A test helper (not part of the package): used by the tests, ``benchmarks/report.py`` and
``scripts/report_screenshot.py``. Playwright is a dev dependency and never downloads a browser
here: it drives the system ``chromium`` (Debian package; see ``scripts/ensure_chromium.sh``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Debian's /usr/bin/chromium is a shell wrapper around /usr/lib/chromium/chromium. Its
# /etc/chromium.d/dev-shm does `[ $(findmnt ... -T /dev/shm) -lt N ]`, which prints
# "[: 25276059648: unexpected operator" wherever /dev/shm is mounted twice (containers): findmnt
# then prints two numbers. Harmless, but noise on every launch, so the real binary comes first
# (the flag that script would add, --disable-dev-shm-usage, is passed by open_page).
CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser",
              "/usr/bin/google-chrome")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
# file:// pages are each their own origin, so a canvas that drew a file's image is "tainted" and
# cannot be read back; this flag lets a test compare the drawn pixels (the CSP still applies).
PIXELS = ("--allow-file-access-from-files",)


def chromium_path() -> str | None:
    """``$BRANCHLENS_CHROMIUM``, a usual system location, or a chromium on PATH."""
    for c in (os.environ.get("BRANCHLENS_CHROMIUM"), *CANDIDATES, shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def browser_version() -> str:
    """"Chromium 156.0.8078.114 (/usr/lib/chromium/chromium), playwright 1.65.2", or why not:
    printed in the test header so that a browser failure names the browser it ran against."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    why = unavailable_reason()
    if why is not None:
        return f"unavailable: {why}"
    exe = chromium_path()
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        name = out.stdout.strip() or f"unknown version (exit {out.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        name = f"unknown version ({e})"
    try:
        pw = version("playwright")
    except PackageNotFoundError:
        pw = "?"
    return f"{name} ({exe}), playwright {pw}"


def wait_until(page: Any, predicate: str, arg: Any = None, timeout: float | None = None) -> None:
    """``page.wait_for_function`` for a *function* predicate only.

    Playwright polls a bare expression string with ``eval`` inside the page, which the report's
    CSP (``script-src 'self'``, no 'unsafe-eval') forbids; a function source is not eval'd. An
    expression that happens to be true at the first check passes, so the mistake would only
    show on a slower machine: refuse it here instead.
    """
    src = predicate.lstrip()
    if not (src.startswith(("(", "function", "async")) or re.match(r"^\w+\s*=>", src)):
        raise ValueError(f"wait_until needs a function predicate like '() => ...', got {src!r}")
    page.wait_for_function(predicate, arg=arg, timeout=timeout)


def unavailable_reason() -> str | None:
    """Why a browser check cannot run here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "no system chromium (run scripts/ensure_chromium.sh)"
    return None


@dataclass
class PageLog:
    """What the page reported while it was open."""

    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)  # alert()/confirm(): injected script ran
    requests: list[str] = field(default_factory=list)  # anything but file:/data: URLs


@contextmanager
def open_page(html_path: str | Path, width: int = 1400, height: int = 1000,
              args: tuple[str, ...] = ()) -> Iterator[tuple[Any, PageLog]]:
    """Yield (playwright Page, PageLog) for ``html_path`` loaded from ``file://``; ``args``:
    more Chromium flags (``PIXELS`` lets a test read back canvases drawn from files)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError(unavailable_reason() or "no chromium")
    log = PageLog()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=[*LAUNCH_ARGS, *args])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(10_000)
            page.on("console", lambda m: log.console_errors.append(m.text)
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: log.console_errors.append(f"pageerror: {e}"))
            page.on("dialog", _dismiss(log.dialogs))
            page.on("request", lambda r: log.requests.append(r.url)  # blob: = our downloads
                    if not r.url.startswith(("file:", "data:", "blob:")) else None)
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load")
            yield page, log
        finally:
            browser.close()


def _dismiss(sink: list[str]) -> Callable[[Any], None]:
    def handler(dialog: Any) -> None:
        sink.append(dialog.message)
        dialog.dismiss()

    return handler


def broken_images(page: Any) -> list[str]:
    """Alt texts of ``<img>`` elements that do not decode (lazy ones are loaded first)."""
    return page.evaluate(
        "Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; "
        "return i.decode().then(() => null, () => i.alt || i.src.slice(-40)); }))"
        ".then(r => r.filter(x => x))")


def wait_ready(page: Any) -> None:
    """Until the latent browser has started (or the page has no browser)."""
    wait_until(page, "() => window.BL === undefined || window.BL.ready === true || "
                     "!document.getElementById('tbody')")


def shown_count(page: Any) -> int:
    """Latents the table's filters let through (the counter reads "N of M latents")."""
    return int(page.inner_text("#f-count").split(" of ")[0])


def open_latent(page: Any, layer: str, latent: int) -> float:
    """Open one latent page through its URL hash; returns milliseconds until it is drawn."""
    page.evaluate("([l, j]) => { window.BL.lastOpenMs = null; "
                  "location.hash = '#latent/' + encodeURIComponent(l) + '/' + j; }",
                  [layer, latent])
    wait_until(page, "([l, j]) => { const a = document.getElementById('latent'); "
                     "return !a.hidden && a.dataset.layer === l && "
                     "a.dataset.latent === String(j) && window.BL.lastOpenMs !== null; }",
               arg=[layer, latent])
    return float(page.evaluate("window.BL.lastOpenMs"))


def open_crops(page: Any, layer: str, latent: int) -> tuple[float, float, list[dict]]:
    """Open a latent page and wait until its example crops are drawn (chunk, images and
    overlays); returns (ms until the page, ms until the last crop, one dict per crop)."""
    page_ms = open_latent(page, layer, latent)
    wait_until(page, "() => { const g = document.querySelector('#latent .gallery'); "
                     "return !!g && g.dataset.drawn !== undefined && "
                     "window.BL.lastGalleryMs !== null; }")
    crops = page.evaluate(
        "() => Array.from(document.querySelectorAll('#latent .gallery figure.crop')).map(f => {"
        " const c = f.querySelector('canvas'); return {width: c.clientWidth, height: "
        "c.clientHeight, box: c.dataset.box.split(',').map(Number), unit: "
        "c.dataset.unit.split(',').map(Number), cls: f.querySelector('.cls').textContent, "
        "caption: f.querySelector('figcaption').textContent, title: f.title, "
        "broken: f.classList.contains('broken')}; })")
    return page_ms, float(page.evaluate("window.BL.lastGalleryMs")), crops


def canvas_pixels(page: Any, index: int) -> Any:
    """RGB [n, n, 3] uint8 of the ``index``-th crop canvas (needs ``open_page(args=PIXELS)``)."""
    import numpy as np

    w, data = page.evaluate(
        "i => { const c = document.querySelectorAll('#latent .gallery canvas')[i]; "
        "return [c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data)]; }", index)
    return np.asarray(data, dtype=np.uint8).reshape(w, w, 4)[..., :3]


def screenshots(html_path: str | Path, report_png: str | Path, latent_png: str | Path,
                latent: tuple[str, int] | None = None, width: int = 1400,
                height: int = 1100) -> tuple[Path, Path]:
    """Docs pictures: the report's top over the latent browser, and one latent page."""
    import io

    from PIL import Image

    with open_page(html_path, width, height) as (page, _):
        wait_ready(page)
        parts = [page.screenshot()]
        page.evaluate("window.scrollTo(0, document.getElementById('latents')"
                      ".getBoundingClientRect().top + window.scrollY - 40)")
        page.wait_for_timeout(150)
        parts.append(page.screenshot())
        if latent is None:
            latent = page.evaluate("(() => { const r = document.querySelector('#tbody .trow');"
                                   " const id = +r.dataset.id; return [window.BL && "
                                   "JSON.parse(document.getElementById('bl-meta').textContent)"
                                   ".layers[(id / 1048576) | 0].name, id % 1048576]; })()")
        open_latent(page, latent[0], latent[1])
        page.wait_for_timeout(300)  # lazy images
        box = page.query_selector("#latent").bounding_box()
        page.set_viewport_size({"width": width, "height": int(min(box["height"] + 80, 2400))})
        page.evaluate("document.getElementById('latent').scrollIntoView()")
        page.wait_for_timeout(200)
        lat_png = page.screenshot()
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in parts]
    canvas = Image.new("RGB", (width, sum(i.height for i in images) + 8 * (len(images) - 1)),
                       (200, 200, 200))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + 8
    outs = []
    for img, out in ((canvas, report_png), (Image.open(io.BytesIO(lat_png)).convert("RGB"),
                                            latent_png)):
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, format="PNG", optimize=True)
        outs.append(out)
    return outs[0], outs[1]
