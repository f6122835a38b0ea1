"""Build a run's report into a folder and save screenshots of it (headless Chromium) for the docs.

    .venv/bin/python scripts/report_screenshot.py RUN [OUT_FOLDER] [docs/report.png]
        [docs/latent.png] [LAYER:LATENT]

The first picture is the top of the report stacked over the latent browser; the second one
latent page. OUT_FOLDER (default RUN/report) lets a read-only run be pictured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _browser import broken_images, open_page, screenshots, unavailable_reason, wait_ready  # noqa: E402
from branchlens.report import build_report  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    run = Path(argv[0])
    folder = Path(argv[1]) if len(argv) > 1 else None
    report_png = Path(argv[2]) if len(argv) > 2 else Path("docs/report.png")
    latent_png = Path(argv[3]) if len(argv) > 3 else Path("docs/latent.png")
    latent = None
    if len(argv) > 4:
        layer, _, j = argv[4].partition(":")
        latent = (layer, int(j))
    why = unavailable_reason()
    if why:
        print(f"cannot take a screenshot: {why}", file=sys.stderr)
        return 1
    html = build_report(run, folder)
    with open_page(html) as (page, log):
        wait_ready(page)
        broken = broken_images(page)
    if log.console_errors or broken:
        print(f"report has problems: console errors {log.console_errors}, broken images "
              f"{broken}", file=sys.stderr)
        return 1
    a, b = screenshots(html, report_png, latent_png, latent)
    print(f"{a} and {b} from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
