"""Build a run's report and save a screenshot of it (real headless Chromium) for the docs.

    .venv/bin/python scripts/report_screenshot.py runs/demo [docs/report.png]

The picture is the top of the report stacked over the top of the feature gallery.
"""

from __future__ import annotations

import sys
from pathlib import Path

from branchlens.report import build_report
from branchlens.report.browser import broken_images, open_page, screenshot, unavailable_reason


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    run = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else Path("docs/report.png")
    why = unavailable_reason()
    if why:
        print(f"cannot take a screenshot: {why}", file=sys.stderr)
        return 1
    html = build_report(run)
    with open_page(html) as (page, log):
        broken = broken_images(page)
    if log.console_errors or broken:
        print(f"report has problems: console errors {log.console_errors}, broken images "
              f"{broken}", file=sys.stderr)
        return 1
    print(f"{screenshot(html, out)} from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
