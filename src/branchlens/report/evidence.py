"""Under each claim, the latents it rests on: picture, branch-restricted picture, numbers.

The visualize stage (``select=evidence``) writes ``viz/featurevis/<layer>/evidence.json``: the
most significant robust latents of every (layer, branch) cell and the best cross-layer matched
pairs, with the files of their pictures. Here each tile links to the latent's own page in the
browser (its top examples, every ratio and q-value); the cross-layer claim shows its matched
pairs side by side. All text is escaped; images are copied into the report's assets.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import quote

from branchlens.layout import RunLayout
from branchlens.report.images import image_src
from branchlens.report.markup import esc, fmt, name_html

# claim id -> which cells it rests on (None: every branch)
CELL_CLAIMS = {"specialise": None, "five_by_five": "5x5", "animals": "5x5", "animals_causal": "5x5",
               "paper_curve": "5x5"}


def short_name(image_id: str) -> str:
    """"imagenet-sample/n01440764_tench.JPEG#flip" -> "tench": what a reader calls the image."""
    name = image_id.rsplit("/", 1)[-1].split("#", 1)[0].rsplit(".", 1)[0]
    return re.sub(r"^n\d{8}_?", "", name).replace("_", " ") or name


def _strips(ctx: Any, layer: str, cache: dict) -> dict[int, tuple[str, list[str]]]:
    """latent -> (file of its examples strip, the image ids in it, best first)."""
    key = ("strips", layer)
    if key not in cache:
        p = RunLayout(ctx.run_dir).examples_dir(layer) / "index.json"
        try:
            doc = json.loads(p.read_text()) if p.is_file() else {}
            cache[key] = {int(e["latent"]): (str(e["file"]), [
                str(x.get("image_id", "")) for x in e.get("examples") or []
                if isinstance(x, dict)]) for e in doc.get("latents", [])
                if isinstance(e, dict) and "file" in e}
        except (OSError, ValueError, KeyError, TypeError):
            cache[key] = {}
    return cache[key]


def _docs(ctx: Any) -> dict[str, dict[str, Any]]:
    run, out = RunLayout(ctx.run_dir), {}
    for layer in ctx.layers:
        p = run.evidence_path(layer)
        try:
            doc = json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            ctx.notes.append(f"could not read {p}")
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("pictures"), dict):
            out[layer] = doc
    return out


def _row(ctx: Any, layer: str, j: int, branch: str | None) -> dict[str, Any]:
    """The numbers a tile shows, from the latent table the report already read column-wise
    (parsing latents.csv again per layer and claim doubled a 16× report's build time)."""
    cols = (getattr(ctx, "columns", None) or {}).get(layer)
    if cols is None or branch is None or not 0 <= j < cols.n:
        return {}
    names = [f"q_raw_{branch}", f"q_scale_{branch}", f"paper_ratio_{branch}"]
    return {k: float(cols.f(k)[j]) for k in names}


def _img(ctx: Any, layer: str, name: Any, alt: str, examples: bool = False) -> str:
    if not isinstance(name, str) or "/" in name or "\\" in name:
        return ""
    from branchlens.report.builder import find_run_image

    run = RunLayout(ctx.run_dir)
    folder = run.examples_dir(layer) if examples else run.featurevis_dir(layer)
    path = find_run_image(folder, name, ctx.run_dir)  # confined to the run (no symlink out)
    src = image_src(ctx, path) if path is not None else None
    cls = ' class="strip"' if examples else ""
    return f'<img{cls} loading="lazy" src="{esc(src)}" alt="{esc(alt)}">' if src else ""


def _tile(ctx: Any, doc: dict, layer: str, j: int, branch: str | None, cache: dict) -> str:
    pics = doc["pictures"].get(str(j)) or {}
    row = _row(ctx, layer, j, branch)
    imgs = _img(ctx, layer, pics.get("full"), f"{layer} #{j}")
    if branch:
        imgs += _img(ctx, layer, pics.get(branch), f"{layer} #{j}, {branch} part alone")
    strip, ids = _strips(ctx, layer, cache).get(j, (None, []))
    imgs += _img(ctx, layer, strip, f"{layer} #{j}: top examples: " + ", ".join(ids),
                 examples=True)
    nums = []
    if branch:
        q = max((row.get(f"q_{r}_{branch}", math.nan) for r in ("raw", "scale")),
                key=lambda v: -1 if v != v else v)
        nums = [f"{esc(branch)} ratio {fmt(row.get(f'paper_ratio_{branch}'))}",
                f"q ≤ {fmt(q, 2)}"]
    label = f"{esc(layer)} #{j}" + (" · " + " · ".join(nums) if nums else "")
    if strip and ids:
        label += "<br>top: " + " · ".join(name_html(short_name(i)) for i in ids[:6])
    href = f"#latent/{quote(layer, safe='')}/{j}"
    return (f'<a class="ev" href="{esc(href)}">{imgs or "<span class=na>no picture</span>"}'
            f"<span>{label}</span></a>")


def claim_gallery(ctx: Any, claim_id: str, per_cell: int = 4) -> str:
    """HTML of the evidence tiles for one claim ("" when the stage rendered none)."""
    docs = _docs(ctx)
    if not docs:
        return ""
    cache: dict = {}
    parts = []
    if claim_id in CELL_CLAIMS:
        only = CELL_CLAIMS[claim_id]
        for layer, doc in docs.items():
            if claim_id == "paper_curve" and layer != "mixed4c":
                continue
            for b, js in (doc.get("cells") or {}).items():
                if only is not None and b != only:
                    continue
                tiles = "".join(_tile(ctx, doc, layer, int(j), b, cache)
                                for j in js[:per_cell])
                parts.append(f'<div class="evrow"><b>{esc(layer)} {esc(b)}</b>'
                             f'<div class="evtiles">{tiles}</div></div>')
    elif claim_id == "across_layers":
        for layer, doc in docs.items():
            for p in doc.get("pairs") or []:
                if p.get("up") != layer or p.get("down") not in docs:
                    continue
                a = _tile(ctx, doc, layer, int(p["a"]), None, cache)
                b = _tile(ctx, docs[p["down"]], p["down"], int(p["b"]), None, cache)
                parts.append(f'<div class="evrow pair">{a}<span class="eq">↔ corr '
                             f'{fmt(p.get("corr"), 2)}</span>{b}</div>')
    if not parts:
        return ""
    return ('<details class="evidence"><summary>the latents it rests on: each one\'s feature '
            "picture, the picture of its branch's part alone, its top held-out examples (the "
            "latent's map in red); click one for its page with every number</summary>"
            + "".join(parts) + "</details>")
