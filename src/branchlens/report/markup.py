"""HTML building blocks of the report's overview sections: escaping, numbers, tables, figures.

Every value that reaches the page goes through :func:`esc` (labels, image ids and file names
come from user data); user-supplied names also go through :func:`name_html`, which isolates
them and shows bidi controls.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from branchlens.report.builder import ReportContext, shell_command

BRANCH_COLORS = {"1x1": "#1f77b4", "3x3": "#2ca02c", "5x5": "#d62728", "pool": "#9467bd",
                 "none": "#9a9a9a"}


def esc(x: Any) -> str:
    """HTML-escaped text of any value (None: an em dash)."""
    return "—" if x is None else html.escape(str(x), quote=True)


# Unicode bidi controls: an override (U+202E) in one file name would reverse every name after
# it; names are isolated (<bdi>) and these shown as visible markers instead.
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible_bidi(text: str) -> str:
    """``text`` with each bidi control spelled ``⟨U+202E⟩`` (what the file name really holds)."""
    return BIDI_CONTROLS.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)


def name_html(x: Any) -> str:
    """A user-supplied name (file, image id) as an isolated, escaped span of text."""
    return f"<bdi>{esc(visible_bidi(str(x)))}</bdi>"


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers compactly (ints with separators, floats to ``digits`` significant), escaped."""
    if isinstance(x, bool) or x is None:
        return esc(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return esc(x)


def na(what: str, command: str, ctx: ReportContext) -> str:
    """The note shown in place of a section whose stage has not run."""
    return (f'<p class="na">{esc(what)} not available: run '
            f'<code>{esc(shell_command("branchlens", command, ctx.run_dir))}</code></p>')


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """A table; cells are pre-formatted HTML (callers escape), headers are escaped here."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def figure(uri: str | None, alt: str, caption: str = "") -> str:
    if not uri:
        return f'<p class="na">{esc(alt)}: figure file missing or unreadable</p>'
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(uri)}" alt="{esc(alt)}" loading="lazy">{cap}</figure>'


def branch_tag(b: Any) -> str:
    color = BRANCH_COLORS.get(str(b), "#555")
    return f'<span class="tag" style="background:{color}">{esc(b)}</span>'


def json_details(title: str, obj: Any, limit: int = 20000) -> str:
    """A collapsed, escaped JSON dump (long lists such as shard rows are cut)."""
    text = json.dumps(_trim(obj), indent=1, default=str)
    if len(text) > limit:
        text = text[:limit] + "\n…"
    return f"<details><summary>{esc(title)}</summary><pre>{esc(text)}</pre></details>"


def _trim(o: Any, n: int = 8) -> Any:
    if isinstance(o, dict):
        return {k: _trim(v, n) for k, v in o.items()}
    if isinstance(o, list) and len(o) > n:
        return [_trim(v, n) for v in o[:n]] + [f"… {len(o) - n} more"]
    return o
