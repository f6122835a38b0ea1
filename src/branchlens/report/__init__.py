"""The report of a run as a folder opened straight from disk: ``RUN/report/index.html`` +
``RUN/report/assets/``, written by the report stage (:func:`branchlens.stages.report.build_report`,
re-exported here for one release); this package renders the page and writes its assets.

A folder, because a 16× run on five layers has tens of thousands of latents: the page holds the
overview (claims, run, SAE quality, tests) and a browser for every latent whose data lives in
one compact script file per layer plus detail chunks and images loaded only when needed (see
:mod:`branchlens.report.browse`). It works offline from ``file://``: no server, no remote
resource, and a Content-Security-Policy forbids any network access. HTML goes through Jinja2
with autoescaping; the page script builds the browser with ``textContent`` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from branchlens.report import sections as S
from branchlens.report.builder import ReportContext, find_key, gather, shell_command
from branchlens.report.markup import BRANCH_COLORS, esc

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
             or f"not run: {shell_command('branchlens', 'stability', ctx.run_dir)}",
             "stable": (c.get("stability") or {}).get("stable"),
             "gallery": Markup(_section(lambda x, i=c.get("id"): claim_gallery(x, str(i)), ctx))}
            for c in ctx.summary.get("claims") or [] if isinstance(c, dict)]


def _section(fn: Callable[[ReportContext], str], ctx: ReportContext) -> str:
    try:
        return fn(ctx)
    except Exception as e:  # noqa: BLE001 - one odd artifact must not sink the report
        return (f'<p class="na">this section failed to render: '
                f"{esc(type(e).__name__)}: {esc(e)}</p>")


def render(ctx: ReportContext, browser: dict[str, Any]) -> str:
    """The page (``browser``: the latent browser's meta, as :func:`write_assets` returns it)."""
    from markupsafe import Markup

    bodies = {"data": S.data_section, "sae": S.sae_section,
              "specialization": S.specialization_section, "curves": S.curves_section,
              "crosslayer": S.crosslayer_section, "categories": S.category_section,
              "circuits": S.circuits_section}
    # the older overview sections escape every value themselves (markup.esc)
    secs = [(k, t, Markup(_section(bodies[k], ctx))) for k, t in SECTIONS]
    q = float(((ctx.summary or {}).get("config") or {}).get("q", 0.05))
    return _env().get_template("index.html.j2").render(
        title=f"branchlens report: {ctx.run_dir.name}", csp=CSP, assets=ASSETS,
        random_weights=ctx.random_weights, notes=ctx.notes,
        overview=overview(ctx, time.strftime("%Y-%m-%d %H:%M:%S %Z")), claims=claims(ctx),
        stability=Markup(_section(S.stability_section, ctx)),
        run_dir=str(ctx.run_dir), sections=secs, browser=browser, q=q, sh=shell_command,
        na=lambda what, cmd: f"{what} not available: run "
                             f"{shell_command('branchlens', cmd, ctx.run_dir)}")


def write_assets(ctx: ReportContext, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Scripts, styles and the browser's data files under ``root``; returns the browser meta."""
    from branchlens.report.assets import Assets
    from branchlens.report.browse import write_layer
    from branchlens.report.gallery import GALLERY_PX

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
            "colors": BRANCH_COLORS, "crop_px": GALLERY_PX}


def __getattr__(name: str):
    if name == "build_report":  # lazy: the stage imports this package
        from branchlens.stages.report import build_report  # moved; kept for one release

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
