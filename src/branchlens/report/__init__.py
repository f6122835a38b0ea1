"""One self-contained HTML report per run: ``build_report(run_dir) -> RUN/report/index.html``.

Self-contained because reports get mailed, archived and opened from disk: images are inlined as
data URIs, CSS and JS are inline, and a Content-Security-Policy forbids any network access.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from string import Template

from branchlens.artifacts import atomic_path
from branchlens.report import sections as S
from branchlens.report.builder import ReportContext, gather
from branchlens.report.gallery import gallery

__all__ = ["ReportContext", "build_report", "gather", "render"]

SECTIONS = (
    ("claims", "The paper's claims"),
    ("data", "Data"),
    ("sae", "SAE quality"),
    ("specialization", "Branch specialization"),
    ("curves", "Sorted-ratio curves"),
    ("crosslayer", "Cross-layer consistency"),
    ("categories", "Category test"),
    ("embedding", "Latent embedding (UMAP)"),
    ("circuits", "Circuits"),
    ("gallery", "Feature gallery"),
)


def _asset(name: str) -> str:
    return resources.files("branchlens.report").joinpath(name).read_text(encoding="utf-8")


def render(ctx: ReportContext, cards_per_layer: int = 48) -> str:
    """The whole page as a string (no file I/O besides reading artifacts and assets)."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    bodies = {
        "claims": S.claims_section, "data": S.data_section, "sae": S.sae_section,
        "specialization": S.specialization_section, "curves": S.curves_section,
        "crosslayer": S.crosslayer_section, "categories": S.category_section,
        "embedding": S.embedding_section, "circuits": S.circuits_section,
        "gallery": lambda c: gallery(c, cards_per_layer),
    }
    parts = [f'<section id="overview">{S.header(ctx, generated)}</section>']
    for key, title in SECTIONS:
        try:
            inner = bodies[key](ctx)
        except Exception as e:  # noqa: BLE001 - one odd artifact must not sink the report
            inner = (f'<p class="na">this section failed to render: '
                     f"{S.esc(type(e).__name__)}: {S.esc(e)}</p>")
        parts.append(f'<section id="{key}"><h2>{S.esc(title)}</h2>{inner}</section>')
    nav = '<a href="#overview">Overview</a>' + "".join(
        f'<a href="#{key}">{S.esc(title)}</a>' for key, title in SECTIONS)
    return Template(_asset("template.html")).substitute(
        title=S.esc(f"branchlens report: {ctx.run_dir.name}"), css=_asset("report.css"),
        js=_asset("report.js"), nav=nav, body="\n".join(parts))


def build_report(run_dir: str | Path, out: str | Path | None = None,
                 cards_per_layer: int = 48) -> Path:
    """Write the report of ``run_dir`` (default ``RUN/report/index.html``, atomically).

    Works on partial runs: sections whose stage has not run say which command to run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    page = render(gather(run_dir), cards_per_layer)
    out = Path(out) if out is not None else run_dir / "report" / "index.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(0o644)  # a report is for sharing (the temp file starts private)
    return out
