"""Data files of the latent browser: every latent of every layer, loaded by ``index.html`` from
disk (``file://``, no server).

Each data file is a script that hands its object to the page (``BL.table(...)``,
``BL.detail(...)``; :mod:`branchlens.report.assets`). Per layer there is one compact
*table* file (columns the table sorts and filters on, the embedding coordinates), loaded at
start, and *detail* chunks of ``CHUNK`` latents (null bands, p-values, examples, upstream
latents, neighbours), loaded when a latent is opened. Images are files loaded lazily: feature
visualizations re-encoded as thumbnails. Dataset examples come as *gallery* chunks
(:mod:`branchlens.report.gallery`). Runs whose examples stage wrote sprite sheets (earlier
versions) still show those.

Dominant branch, significance and q-values are the analysis stage's columns (latents.csv);
nothing here re-decides them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.analysis.table import split_list
from branchlens.layout import RunLayout
from branchlens.report import geometry
from branchlens.report.assets import (
    Assets,
    ints,
    nulls,
    rounded,
    short,
    sig_list,
    sig_round,
    write_script,
)
from branchlens.report.builder import ReportContext, find_run_image
from branchlens.report.columns import NUMERIC, PER_BRANCH, LayerColumns, numeric_columns  # noqa: F401
from branchlens.report.gallery import gallery_examples, write_gallery

CHUNK = 256
FEATUREVIS_PX = 160


def _index_of(names: list[str], vocab: list[str], none: int = -1) -> list[int]:
    lookup = {v: i for i, v in enumerate(vocab)}
    return [lookup.get(x, none) for x in names]


def _embedding(path: Path, n: int) -> tuple[list, list] | None:
    """A layer's embedding (``RunLayout.embedding_path``) scaled to integers 0..1000 (NaN rows:
    null)."""
    if not path.is_file():
        return None
    try:
        xy = np.load(path, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError):
        return None
    if xy.ndim != 2 or xy.shape[1] < 2:
        return None
    full = np.full((n, 2), np.nan)
    m = min(n, xy.shape[0])
    full[:m] = xy[:m, :2]
    ok = np.isfinite(full).all(1)
    if not ok.any():
        return None
    lo, hi = full[ok].min(0), full[ok].max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    s = np.round((full - lo) / span * 1000)
    return ints(s[:, 0], -1), ints(1000 - s[:, 1], -1)  # y grows downwards on a canvas


def sprite_examples(run: Path, layer: str) -> dict | None:
    """The examples stage's sprite index and top table of ``layer`` (None when absent)."""
    lay = RunLayout(run)
    d = lay.examples_dir(layer)
    idx_path, top_path = d / "sprites.json", lay.top_table_path(layer)
    if not (idx_path.is_file() and top_path.is_file()):
        return None
    try:
        idx = json.loads(idx_path.read_text())
        from safetensors import safe_open

        with safe_open(str(top_path), framework="np") as f:
            meta = f.metadata() or {}
            values = f.get_tensor("values")
            images = f.get_tensor("images")
        ids = json.loads(meta.get("image_ids", "[]")) if isinstance(meta.get("image_ids"),
                                                                    str) else []
    except Exception:  # noqa: BLE001 - the report notes it and goes on without crops
        return None
    return {"index": idx, "dir": d, "values": values, "images": images, "ids": ids}




def layer_effects(run_dir: Path, layer: str) -> dict[int, list[str]] | None:
    """{latent: [promotes, suppresses]} from the effects stage's table of ``layer``, or None
    when the stage has not run (a malformed row is left out, never guessed)."""
    import csv

    path = RunLayout(run_dir).effects_table_path(layer)
    if not path.is_file():
        return None
    out: dict[int, list[str]] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            try:
                out[int(row["latent"])] = [row.get("promotes") or "", row.get("suppresses") or ""]
            except (KeyError, TypeError, ValueError):
                continue
    return out


def _class_names(variant: str | None) -> list[str]:
    try:
        from branchlens.variants import class_names

        return list(class_names(variant or "bvlc_googlenet"))
    except Exception:  # noqa: BLE001 - labels are a nicety
        return []


def write_layer(ctx: ReportContext, li: int, layer: str, cols: LayerColumns | None,
                data_dir: Path, assets: Assets, q: float,
                progress: Callable[[str], None] = lambda s: None) -> dict:
    """Table file and detail chunks of one layer; returns the layer's entry for meta."""
    branches = ctx.branches(layer)
    dec = geometry.load_decoder(ctx.layout.sae_dir(layer)) if layer in ctx.saes else None
    n = max(cols.n if cols else 0, dec.shape[0] if dec is not None else 0)
    if cols is None:
        cols = LayerColumns(layer, n)
    elif cols.n < n:  # pad a table shorter than the SAE
        cols = LayerColumns(layer, n, {k: np.concatenate([v, np.full(n - v.size, np.nan)])
                                       for k, v in cols.num.items()},
                            {k: v + [""] * (n - len(v)) for k, v in cols.text.items()})
    alive = np.nan_to_num(cols.f("alive"), nan=0.0) > 0
    slices = ctx.slices(layer)
    band = nb = None
    if dec is not None and slices and dec.shape[1] == max(b for _, b in slices.values()):
        progress(f"{layer}: null bands and neighbours of {n} latents")
        band = geometry.null_band(dec, slices)
        nb = geometry.neighbours(dec, include=alive if alive.any() else None)
    cats = sorted({c for c in cols.s("top_category") if c})
    doms = [*branches, "none"]
    t: dict[str, Any] = {
        "alive": ints(alive), "rate": sig_list(cols.f("firing_rate")),
        "nimg": ints(cols.f("n_images_fired"), 0),
        "dom": _index_of([d or "none" for d in cols.s("dominant")], doms, len(doms) - 1),
        "rdom": _index_of([d or "none" for d in cols.s("robust_dominant")], doms,
                          len(doms) - 1),
        "cat": _index_of(cols.s("top_category"), cats, -1),
    }
    sr, ss = np.zeros(n, np.int64), np.zeros(n, np.int64)  # bit b: q of branch b <= q
    for bi, b in enumerate(branches):
        t[f"r{bi}"] = rounded(cols.f(f"paper_ratio_{b}"), 3)
        t[f"qr{bi}"] = sig_list(cols.f(f"q_raw_{b}"), 2)
        t[f"qs{bi}"] = sig_list(cols.f(f"q_scale_{b}"), 2)
        with np.errstate(invalid="ignore"):
            sr |= (cols.f(f"q_raw_{b}") <= q).astype(np.int64) << bi
            ss |= (cols.f(f"q_scale_{b}") <= q).astype(np.int64) << bi
    t["sr"], t["ss"] = sr.tolist(), ss.tolist()  # exact decisions; q columns are rounded
    emb = _embedding(ctx.layout.embedding_path(layer), n)
    if emb is not None:
        t["x"], t["y"] = emb
    gal = gallery_examples(ctx, layer)
    ex = None if gal is not None else sprite_examples(ctx.run_dir, layer)  # earlier versions
    has_ex = np.zeros(n, bool)
    has_fv = np.zeros(n, bool)
    for (lay, lat), lv in ctx.viz.items():
        if lay == layer and 0 <= lat < n:
            has_ex[lat] |= bool(lv.examples)
            has_fv[lat] |= bool(lv.featurevis)
    if ex is not None:
        v = ex["values"]
        m = min(n, v.shape[0])
        has_ex[:m] |= v[:m, 0] > 0
    if gal is not None:
        m = min(n, gal["images"].shape[0])
        has_ex[:m] |= gal["images"][:m, 0] >= 0
    t["ex"], t["fv"] = ints(has_ex), ints(has_fv)
    size = write_script(data_dir / f"t{li}.js", "table", li, t)

    labels = _class_names(ctx.variant)
    gmeta = write_gallery(ctx, li, gal, data_dir, assets, labels) if gal is not None else None
    pre = {key: [nulls(r) for r in sig_round(np.stack(
        [cols.f(f"{col}_{b}") for b in branches], 1)).tolist()]
        for key, col in (("pr", "p_raw"), ("ps", "p_scale"), ("qr", "q_raw"),
                         ("qs", "q_scale"), ("en", "enrichment"), ("at", "attribution"))}
    facts = [k for k in ("mean_activation", "mean_when_active", "d_eff", "animal_fraction",
                         "dog_fraction") if k in cols.num]
    fact_rows = sig_round(np.stack([cols.f(k) for k in facts], 1)).tolist() if facts else []
    pre["m"] = [{k: v for k, v in zip(facts, r, strict=True) if v == v} for r in fact_rows]
    band_l = np.round(band.astype(np.float64), 3).tolist() if band is not None else None
    effects = layer_effects(ctx.run_dir, layer)
    chunks = 0
    for c0 in range(0, n, CHUNK):
        items = [_detail(ctx, layer, j, cols, pre, band_l, nb, ex, assets, labels, li)
                 for j in range(c0, min(n, c0 + CHUNK))]
        for j, d in zip(range(c0, min(n, c0 + CHUNK)), items, strict=True):
            if effects is not None:  # 0: the stage ran but did not ablate this latent
                d["eff"] = effects.get(j, 0)
        size += write_script(data_dir / f"d{li}_{c0 // CHUNK}.js", "detail", li, c0 // CHUNK,
                             items)
        chunks += 1
    return {"name": layer, "n": n, "branches": branches, "doms": doms, "cats": cats,
            "alive": int(alive.sum()), "chunks": chunks, "chunk": CHUNK,
            "embedding": emb is not None, "examples": bool(has_ex.any()),
            "featurevis": int(has_fv.sum()), "decoder": dec is not None, "bytes": size,
            "tile": int((ex or {}).get("index", {}).get("tile", 0) or 0), "gallery": gmeta}


def _detail(ctx: ReportContext, layer: str, j: int, cols: LayerColumns,
            pre: dict[str, list], band: list | None, nb: np.ndarray | None, ex: dict | None,
            assets: Assets, labels: list[str], li: int) -> dict:
    """Everything a latent page shows beyond the table columns (``pre``: per-layer columns
    already rounded, indexed by latent)."""
    f = cols.num
    d: dict[str, Any] = {key: rows[j] for key, rows in pre.items() if key != "m"}
    d["m"] = pre["m"][j] if pre["m"] else {}
    if "dead_in_training" in f and f["dead_in_training"][j] == 1:
        d["dead"] = 1
    if band is not None:
        d["band"] = [[None if x != x else x for x in pair] for pair in band[j]]
    if nb is not None:
        d["nb"] = [int(x) for x in nb[j] if x >= 0]
    tops = [s for s in split_list(cols.s("top_images")[j]) if s]
    if tops:
        labs = split_list(cols.s("top_labels")[j])
        d["top"] = [[s, _label(labs[k] if k < len(labs) else "", labels)]
                    for k, s in enumerate(tops)]
    cat = cols.s("top_category")[j]
    if cat:
        d["cat"] = cat
    lv = ctx.viz.get((layer, j))
    if ex is not None and j < ex["values"].shape[0] and ex["values"][j, 0] > 0:
        idx = ex["index"]
        per, sheets = int(idx["per_sheet"]), idx.get("sheets") or []
        s = j // per
        sheet = find_run_image(ex["dir"], sheets[s], ctx.run_dir) if s < len(sheets) else None
        if sheet is not None:  # a sheet named in sprites.json must be an image in the run
            src = assets.copy(sheet, f"ex{li}_{s}.jpg")
            vals = ex["values"][j]
            k = int((vals > 0).sum())
            k = min(k, int(idx.get("n_tiles", k)))
            ids = ex["ids"]
            d["ex"] = {"src": src, "row": j % per, "tile": int(idx["tile"]), "k": k,
                       "ids": [ids[i] if 0 <= i < len(ids) else str(i)
                               for i in ex["images"][j][:k].tolist()],
                       "v": sig_list(vals[:k])}
    if lv is not None:
        fv = [(cap, assets.thumbnail(p, f"fv{li}_{j}_{i}", FEATUREVIS_PX))
              for i, (cap, p) in enumerate(lv.featurevis)]
        d["fv"] = [[cap, src] for cap, src in fv]  # src None: unreadable file
        if lv.examples:  # full-size strips (evidence latents): shown instead of the sprites
            d["strips"] = [[cap, assets.copy(p, f"st{li}_{j}_{i}{p.suffix.lower()}")]
                           for i, (cap, p) in enumerate(lv.examples)]
        if lv.upstream:
            d["up"] = [[u.get("layer"), u["latent"], short(u.get("score")), short(u.get("share")),
                        u.get("dominant")] for u in lv.upstream[:10]]
            d["err"] = short(lv.upstream[0].get("error_share"))
    return d




def _label(s: str, names: list[str]) -> str:
    try:
        i = int(s)
    except ValueError:
        return ""
    return names[i] if 0 <= i < len(names) else ""
