"""The report of a run as a folder opened straight from disk: ``build_report(run_dir)`` ->
``RUN/report/index.html`` + ``RUN/report/assets/``.

A folder, because a 16× run on five layers has tens of thousands of latents: the page holds the
overview (claims, run, SAE quality, tests) and a browser for every latent whose data lives in
one compact script file per layer plus detail chunks and images loaded only when needed (see
:mod:`branchlens.report.browse`). It works offline from ``file://``: no server, no remote
resource, and a Content-Security-Policy forbids any network access. HTML goes through Jinja2
with autoescaping; the page script builds the browser with ``textContent`` only.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from branchlens.artifacts import atomic_path
from branchlens.report import sections as S
from branchlens.report.builder import ReportContext, find_key, gather

__all__ = ["ReportContext", "build_report", "gather", "render"]

ASSETS = "assets"
MARKER = ".branchlens-report"  # marks an assets folder this module may replace
GENERATOR = '<meta name="generator" content="branchlens report">'  # in index.html.j2's head
OLD_TITLE = "<title>branchlens report: "  # the head of pages written before GENERATOR
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; base-uri 'none'; form-action 'none'")

SECTIONS = (
    ("data", "Data"),
    ("sae", "SAE quality"),
    ("specialization", "Branch specialization"),
    ("curves", "Sorted-ratio curves"),
    ("crosslayer", "Cross-layer consistency"),
    ("categories", "Category test"),
    ("circuits", "Circuits"),
)
VERDICT_CLASS = {"supported": "ok", "not supported": "bad", "explained by channel scale": "warn",
                 "not testable": "na"}


def _asset(name: str) -> str:
    return resources.files("branchlens.report").joinpath(name).read_text(encoding="utf-8")


def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.FunctionLoader(_asset), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def overview(ctx: ReportContext, generated: str) -> dict[str, Any]:
    """Facts of the run header (plain values: the template escapes them)."""
    w = ctx.weights or {}
    prov = find_key(ctx.summary, "provenance") or next(
        (s.cfg for s in ctx.saes.values()), None) or find_key(ctx.manifest, "provenance") or {}
    wtxt = None
    if w:
        parts = [w.get("source"), w.get("path") and str(w["path"]).rsplit("/", 1)[-1],
                 w.get("sha256") and f"sha256 {str(w['sha256'])[:12]}…",
                 w.get("seed") is not None and w.get("random") and f"seed {w['seed']}"]
        wtxt = ", ".join(str(p) for p in parts if p)
    run = ctx.run if isinstance(ctx.run, dict) else {}
    stages = run.get("stages") if isinstance(run.get("stages"), dict) else {}
    return {
        "facts": [("run", str(ctx.run_dir)), ("model variant", ctx.variant), ("weights", wtxt),
                  ("layers", ", ".join(ctx.layers) or None),
                  ("branchlens", prov.get("branchlens_version")),
                  ("torch", prov.get("torch_version")), ("report generated", generated)],
        "stages": [(name, st.get("status"), st.get("seconds"), st.get("error") or "")
                   for name, st in stages.items() if isinstance(st, dict)],
    }


def claims(ctx: ReportContext) -> list[dict[str, Any]] | None:
    """The analysis' claims table (None: no analysis yet)."""
    if ctx.summary is None:
        return None
    from markupsafe import Markup

    from branchlens.report.evidence import claim_gallery

    return [{"claim": c.get("claim"), "verdict": c.get("verdict"),
             "cls": VERDICT_CLASS.get(c.get("verdict"), ""), "evidence": c.get("evidence"),
             "rule": c.get("rule"),
             "stability": (c.get("stability") or {}).get("summary")
             or f"not run: {S.shell_command('branchlens', 'stability', ctx.run_dir)}",
             "stable": (c.get("stability") or {}).get("stable"),
             "gallery": Markup(_section(lambda x, i=c.get("id"): claim_gallery(x, str(i)), ctx))}
            for c in ctx.summary.get("claims") or [] if isinstance(c, dict)]


def _section(fn: Callable[[ReportContext], str], ctx: ReportContext) -> str:
    try:
        return fn(ctx)
    except Exception as e:  # noqa: BLE001 - one odd artifact must not sink the report
        return (f'<p class="na">this section failed to render: '
                f"{S.esc(type(e).__name__)}: {S.esc(e)}</p>")


def render(ctx: ReportContext, browser: dict[str, Any]) -> str:
    """The page (``browser``: the latent browser's meta, as :func:`write_assets` returns it)."""
    from markupsafe import Markup

    bodies = {"data": S.data_section, "sae": S.sae_section,
              "specialization": S.specialization_section, "curves": S.curves_section,
              "crosslayer": S.crosslayer_section, "categories": S.category_section,
              "circuits": S.circuits_section}
    # the older overview sections escape every value themselves (sections.esc)
    secs = [(k, t, Markup(_section(bodies[k], ctx))) for k, t in SECTIONS]
    q = float(((ctx.summary or {}).get("config") or {}).get("q", 0.05))
    return _env().get_template("index.html.j2").render(
        title=f"branchlens report: {ctx.run_dir.name}", csp=CSP, assets=ASSETS,
        random_weights=ctx.random_weights, notes=ctx.notes,
        overview=overview(ctx, time.strftime("%Y-%m-%d %H:%M:%S %Z")), claims=claims(ctx),
        stability=Markup(_section(S.stability_section, ctx)),
        run_dir=str(ctx.run_dir), sections=secs, browser=browser, q=q, sh=S.shell_command,
        na=lambda what, cmd: f"{what} not available: run "
                             f"{S.shell_command('branchlens', cmd, ctx.run_dir)}")


def write_assets(ctx: ReportContext, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Scripts, styles and the browser's data files under ``root``; returns the browser meta."""
    from branchlens.report.browse import GALLERY_PX, Assets, write_layer

    (root / "data").mkdir(parents=True)
    (root / MARKER).write_text("written by branchlens.report; replaced on every build\n")
    for name in ("app.js", "report.css"):
        (root / name).write_text(_asset(name), encoding="utf-8")
    ctx.assets = Assets(root)
    q = float(((ctx.summary or {}).get("config") or {}).get("q", 0.05))
    layers = [layer for layer in ctx.layers if layer in ctx.columns or layer in ctx.saes]
    entries = [write_layer(ctx, i, layer, ctx.columns.get(layer), root / "data", ctx.assets,
                           q, log) for i, layer in enumerate(layers)]
    return {"layers": entries, "q": q, "run": str(ctx.run_dir), "base": ASSETS,
            "colors": S.BRANCH_COLORS, "crop_px": GALLERY_PX}


def build_report(run_dir: str | Path, out: str | Path | None = None,
                 cards_per_layer: int = 48, log: Callable[[str], None] | None = None) -> Path:
    """Write the report of ``run_dir``; returns the path of its ``index.html``.

    ``out``: a folder (default ``RUN/report``) or an ``.html`` file name in one. The folder gets
    ``index.html`` and ``assets/``; an existing ``assets/`` or page is replaced only if an
    earlier build made it, and ``run_dir`` must be a run folder. Works on partial runs: what a
    stage has not made is named with its command.
    ``cards_per_layer`` is accepted for configuration compatibility; every latent is browsable.
    """
    del cards_per_layer
    from branchlens.run import check_run_folder

    run_dir = check_run_folder(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    folder, entry = ((out.parent, out.name) if out.suffix.lower() in (".html", ".htm")
                     else (out, "index.html"))
    final = folder / ASSETS
    if final.exists() and not (final / MARKER).is_file():
        raise FileExistsError(f"{final} exists and was not written by branchlens; "
                              "choose another report folder")
    _check_page(folder / entry)
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = folder / f".{ASSETS}-new-{tag}", folder / f".{ASSETS}-old-{tag}"
    with _building(folder):
        _sweep(folder, entry)
        try:
            ctx = gather(run_dir)
            browser = write_assets(ctx, tmp, log or (lambda s: None))
            page = render(ctx, browser)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            _public(final)
            path = folder / entry
            with atomic_path(path) as t:
                t.write_text(page, encoding="utf-8")
                t.chmod(0o644)  # a report is for sharing (the temp file starts private)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def _building(folder: Path) -> Iterator[None]:
    """An exclusive lock on the report folder while one build writes it (``flock`` on the
    folder itself: no lock file, and the kernel drops it when its holder dies, even by
    ``kill -9``), so whatever temp folders a build finds are a dead build's."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another branchlens report is being written into {folder}; "
                                  "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _sweep(folder: Path, entry: str) -> None:
    """Remove what a killed build left (under :func:`_building`): its new or old assets
    folders and the temp file of its page."""
    left = re.compile(rf"\.{ASSETS}-(new|old)-[0-9a-f]{{8}}|\.{re.escape(entry)}\.\w+\.tmp")
    for p in folder.iterdir():
        if not left.fullmatch(p.name) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file():
            p.unlink()


def _check_page(page: Path) -> None:
    """Refuse to replace a page (or a file or folder in its place) that no earlier build wrote:
    ``--out`` may name a folder that holds someone's own ``index.html``."""
    if page.parent.exists() and not page.parent.is_dir():
        raise FileExistsError(f"{page.parent} is a file, not a report folder; pass another "
                              "--out or delete the file")
    if not page.exists() or (page.is_file() and _generated(page)):
        return
    raise FileExistsError(f"{page} exists and was not written by branchlens report; pass "
                          "another --out or delete the file")


def _generated(page: Path) -> bool:
    """Whether a page's head is that of a branchlens report (any version)."""
    with open(page, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return GENERATOR in head or OLD_TITLE in head


def _public(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
