"""Feature gallery: one card per shown latent, rendered server-side (escaped) for vanilla JS.

Cards are plain HTML with ``data-*`` attributes; the page script only hides, shows and reorders
them, so no user-derived string is ever parsed as HTML in the browser.

Which latents: every latent the viz stage rendered and the upstream latents their circuits
link to, then the most specialised alive latents of
each layer (round-robin over dominant branches so that no branch crowds out the others), up to
``per_layer`` cards per layer. Specialization of a latent = max over branches of
``(ratio_b − null_b) / (1 − null_b)`` with ``null_b = √(w_b/d)`` (the ratio a random direction
gets); 0 means "like a random direction", 1 means "entirely in one branch".
"""

from __future__ import annotations

import math
from typing import Any

from branchlens.report.builder import LatentViz, ReportContext
from branchlens.report.images import image_uri
from branchlens.report.sections import BRANCH_COLORS, branch_tag, esc, fmt, na

FEATUREVIS_PX = 160
EXAMPLE_PX = (640, 96)


def _null_ratios(ctx: ReportContext, layer: str, branches: list[str]) -> dict[str, float]:
    per = ((ctx.summary or {}).get("per_layer") or {}).get(layer) or {}
    out = {}
    for r in per.get("branches") or []:
        v = r.get("null_band_q95", r.get("isotropic_null_ratio"))
        if isinstance(v, int | float):
            out[r.get("branch")] = float(v)
    slices = per.get("branch_slices") or (ctx.saes[layer].sae.get("branch_slices")
                                          if layer in ctx.saes else None) or {}
    d = sum(b - a for a, b in slices.values()) if slices else 0
    for b in branches:
        if b not in out and b in slices and d:
            out[b] = math.sqrt((slices[b][1] - slices[b][0]) / d)
    return out


def specialization(row: dict[str, Any], branches: list[str], null: dict[str, float]) -> float:
    """Normalised excess of the best branch's paper ratio over its random-direction value."""
    best = 0.0
    for b in branches:
        r, n = row.get(f"paper_ratio_{b}"), null.get(b)
        if isinstance(r, int | float) and isinstance(n, float) and n < 1:
            best = max(best, (r - n) / (1 - n))
    return best


def select(ctx: ReportContext, per_layer: int) -> list[tuple[str, int, dict[str, Any]]]:
    """(layer, latent, latents.csv row or {}) for every card, viz-rendered latents first."""
    rows = {(r["layer"], r["latent"]): r for r in ctx.latents}
    linked = {(u["layer"], u["latent"]) for lv in ctx.viz.values() for u in lv.upstream[:5]}
    chosen: list[tuple[str, int]] = []
    for layer in ctx.layers:
        mine = sorted(k for k in ctx.viz if k[0] == layer)
        mine += sorted(k for k in linked - set(mine) if k[0] == layer)  # upstream links work
        branches = ctx.branches(layer)
        null = _null_ratios(ctx, layer, branches)
        cands = [r for r in ctx.latents if r["layer"] == layer and r.get("alive") is not False]
        queues: dict[str, list] = {}
        for r in sorted(cands, key=lambda r: -specialization(r, branches, null)):
            queues.setdefault(str(r.get("dominant")), []).append(r)
        order = [q for b, q in sorted(queues.items(), key=lambda kv: kv[0] == "none")]
        while len(mine) < per_layer and any(order):
            for q in order:
                if q and len(mine) < per_layer:
                    k = (layer, q.pop(0)["latent"])
                    if k not in mine:
                        mine.append(k)
        chosen.extend(mine)
    return [(layer, lat, rows.get((layer, lat), {})) for layer, lat in chosen]


def _bars(row: dict[str, Any], branches: list[str], null: dict[str, float], q: float) -> str:
    out = []
    for b in branches:
        r = row.get(f"paper_ratio_{b}")
        if not isinstance(r, int | float):
            continue
        qv = row.get(f"q_raw_{b}")
        sig = isinstance(qv, int | float) and qv <= q
        n = null.get(b)
        mark = (f'<i class="null" style="left:{100 * min(max(n, 0), 1):.1f}%" '
                f'title="null {n:.3f}"></i>' if isinstance(n, float) else "")
        color = BRANCH_COLORS.get(b, "#555")
        out.append(
            f'<div class="bar"><span class="bl">{esc(b)}</span><span class="track">'
            f'<b style="width:{100 * min(max(r, 0), 1):.1f}%;background:{color}"></b>{mark}'
            f'</span><span class="bv">{r:.2f}{" ★" if sig else ""}</span></div>')
    if not out:
        return '<p class="na small">no branch ratios (run <code>branchlens analyze</code>)</p>'
    return '<div class="bars" title="paper ratio ‖relu(v_b)‖/‖relu(v)‖; line: null; ' \
           f'★: significant at q={q:g}">{"".join(out)}</div>'


def _images(items: list[tuple[str, Any]], cls: str, box: tuple[int, int], alt: str) -> str:
    out = []
    for caption, path in items:
        uri = image_uri(path, *box)
        if uri is None:
            out.append(f'<span class="na small">unreadable: {esc(path.name)}</span>')
            continue
        out.append(f'<img class="{cls}" src="{uri}" alt="{esc(alt)}" title="{esc(caption)}: '
                   f'{esc(path.name)}">')
    return "".join(out)


def _upstream(lv: LatentViz | None) -> str:
    if lv is None or not lv.upstream:
        return ""
    items = []
    for u in lv.upstream[:5]:
        score = f" ({u['score']:.3g})" if isinstance(u.get("score"), int | float) else ""
        ref = f"{u.get('layer')}-{u['latent']}"
        dom = f" {branch_tag(u['dominant'])}" if u.get("dominant") else ""
        items.append(f'<li><a href="#card-{esc(ref)}" data-goto="{esc(ref)}">'
                     f"{esc(u.get('layer'))} #{esc(u['latent'])}</a>{dom}{esc(score)}</li>")
    err = lv.upstream[0].get("error_share")
    err = f" (SAE error share {err:.2f})" if isinstance(err, int | float) else ""
    return f'<div class="ups">top upstream latents{esc(err)}<ol>{"".join(items)}</ol></div>'


def card(ctx: ReportContext, layer: str, latent: int, row: dict[str, Any], q: float) -> str:
    """One latent's card: images, branch bars with null marks, categories, upstream links."""
    branches = ctx.branches(layer)
    null = _null_ratios(ctx, layer, branches)
    spec = specialization(row, branches, null) if row else 0.0
    dom = str(row.get("dominant") or "none") if row else "unknown"
    cat = str(row.get("top_category") or "") if row else ""
    rate = row.get("firing_rate") if isinstance(row.get("firing_rate"), int | float) else -1.0
    lv = ctx.viz.get((layer, latent))
    fv = _images(lv.featurevis, "fv", (FEATUREVIS_PX, FEATUREVIS_PX),
                 f"feature visualization of {layer} latent {latent}") if lv else ""
    ex = _images(lv.examples, "ex", EXAMPLE_PX, f"top dataset examples of {layer} #{latent}") \
        if lv else ""
    fv = fv or '<div class="noimg">no feature visualization</div>'
    facts = []
    if row:
        facts.append(f"firing rate {fmt(row.get('firing_rate'))}, "
                     f"{fmt(row.get('n_images_fired'))} images")
        if isinstance(row.get("animal_fraction"), float):
            facts.append(f"animal {row['animal_fraction']:.2f}, dog "
                         f"{fmt(row.get('dog_fraction'), 2)}")
        if row.get("dead_in_training"):
            facts.append("dead in training")
    tops = str(row.get("top_images") or "") if row else ""
    top_html = (f'<details class="tops"><summary>top images</summary>'
                f'{esc(", ".join(t for t in tops.split(";") if t))}</details>' if tops else "")
    key = f"{layer}-{latent}"
    return (
        f'<article class="card" id="card-{esc(key)}" data-layer="{esc(layer)}" '
        f'data-latent="{latent}" data-branch="{esc(dom)}" data-category="{esc(cat)}" '
        f'data-spec="{spec:.6f}" data-rate="{rate:.8g}" '
        f'data-img="{1 if lv and (lv.featurevis or lv.examples) else 0}">'
        f'<header><b>{esc(layer)} #{latent}</b> '
        f'<span class="tag" style="background:{BRANCH_COLORS.get(dom, "#555")}">{esc(dom)}</span>'
        f'{f" <span class=cat>{esc(cat)}</span>" if cat else ""}'
        f'<span class="spec" title="specialization">{spec:.2f}</span></header>'
        f'<div class="fvs">{fv}</div>{f"<div class=exs>{ex}</div>" if ex else ""}'
        f'{_bars(row, branches, null, q) if row else ""}'
        f'<p class="facts">{esc("; ".join(facts))}</p>{_upstream(lv)}{top_html}</article>')


def _options(values: list[str], all_label: str) -> str:
    opts = [f'<option value="">{esc(all_label)}</option>']
    opts += [f'<option value="{esc(v)}">{esc(v)}</option>' for v in values]
    return "".join(opts)


def gallery(ctx: ReportContext, per_layer: int = 48) -> str:
    """Controls (layer, branch, category, sort, search) plus the cards."""
    if not ctx.latents and not ctx.viz:
        return na("feature gallery", "analyze", ctx)
    q = float((ctx.summary or {}).get("config", {}).get("q", 0.05))
    picked = select(ctx, per_layer)
    cards = [card(ctx, layer, lat, row, q) for layer, lat, row in picked]
    layers = sorted({p[0] for p in picked}, key=ctx.layers.index)
    branches = sorted({str(r.get("dominant") or "none") for _, _, r in picked if r})
    cats = sorted({str(r.get("top_category")) for _, _, r in picked
                   if r and r.get("top_category")})
    notes = []
    if not any(lv.featurevis for lv in ctx.viz.values()):
        notes.append(na("feature visualizations", "visualize", ctx))
    if not any(lv.examples for lv in ctx.viz.values()):
        notes.append(na("top dataset examples", "examples", ctx))
    if not ctx.circuits_found:
        notes.append(na("top upstream latents", "circuits", ctx))
    if not ctx.latents:
        notes.append(na("branch ratios and categories", "analyze", ctx))
    total = len(ctx.latents) or len(ctx.viz)
    controls = (
        '<div class="controls">'
        f'<label>layer <select id="f-layer">{_options(layers, "all layers")}</select></label>'
        f'<label>dominant branch <select id="f-branch">{_options(branches, "all")}</select>'
        "</label>"
        f'<label>category <select id="f-cat">{_options(cats, "all")}</select></label>'
        '<label>sort <select id="f-sort"><option value="img-spec">with images first, then '
        'specialization ↓</option><option value="spec">specialization ↓</option>'
        '<option value="rate">firing rate ↓</option><option value="rate-asc">firing rate ↑'
        '</option><option value="id">layer, latent id</option></select></label>'
        '<label>latent <input id="f-search" type="search" placeholder="id, e.g. 123 or '
        'mixed4c:123"></label><span id="f-count"></span></div>')
    return (f'<p class="note">{len(cards)} of {fmt(total)} latents shown: every latent with a '
            f"feature visualization plus the most specialised of each layer (up to {per_layer} "
            "per layer). Bars: paper ratio per branch; the black line marks the ratio of a "
            "random direction; ★ marks significance (BH, channel-permutation null).</p>"
            + "".join(notes) + controls + '<div id="cards" class="cards">' + "".join(cards)
            + '</div><p id="f-empty" class="na" hidden>no latent matches the filters</p>')
