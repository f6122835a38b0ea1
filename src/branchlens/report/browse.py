"""Data files of the latent browser: every latent of every layer, loaded by ``index.html`` from
disk (``file://``, no server).

``fetch()`` of JSON is refused on ``file://``, so each data file is a script that hands its
object to the page (``BL.table(...)``, ``BL.detail(...)``). Per layer there is one compact
*table* file (columns the table sorts and filters on, the embedding coordinates), loaded at
start, and *detail* chunks of ``CHUNK`` latents (null bands, p-values, examples, upstream
latents, neighbours), loaded when a latent is opened. Images are files loaded lazily: feature
visualizations re-encoded as thumbnails. Dataset examples come as *gallery* chunks of
``GALLERY_CHUNK`` latents (``BL.gallery(...)``: per latent its examples as image, unit, value and
the latent's map on that image in a few characters), loaded when a latent is opened; the page
draws each receptive-field crop from the held-out image (copied once, whatever number of
latents and layers show it) with the map overlaid. Runs whose examples stage wrote sprite
sheets (earlier versions) still show those.

Dominant branch, significance and q-values are the analysis stage's columns (latents.csv);
nothing here re-decides them.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.analysis.table import split_list
from branchlens.report import geometry
from branchlens.report.builder import ReportContext, find_run_image
from branchlens.report.columns import NUMERIC, PER_BRANCH, LayerColumns, numeric_columns  # noqa: F401

CHUNK = 256
GALLERY_CHUNK = 64  # latents per gallery file: opening one latent fetches ~50-100 kB
GALLERY_PX = 112  # CSS pixels of one example crop on the latent page (>= 96)
MAP_LEVELS = 63  # a map value is sent as one base64url digit, 1..63 of the latent's best value
B64 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8)
FEATUREVIS_PX = 160
MAX_IMAGE_BYTES = 16 * 2**20  # an example image is a ~20 kB JPEG; a huge file is left out


def _round(a: np.ndarray, digits: int) -> list:
    r = np.round(np.asarray(a, dtype=np.float64), digits)
    return [None if not math.isfinite(x) else x for x in r.tolist()]


def sig_round(a: np.ndarray, digits: int = 3) -> np.ndarray:
    """``a`` rounded to ``digits`` significant digits, vectorised (p- and q-values span many
    decades). Dividing or multiplying by an exact power of ten keeps each value the double
    nearest its short decimal, so JSON writes it short."""
    a = np.asarray(a, dtype=np.float64)
    out = a.copy()
    ok = np.isfinite(a) & (a != 0)
    v = a[ok]
    e = np.floor(np.log10(np.abs(v))).astype(np.int64) - (digits - 1)
    r = v.copy()
    up, down = e >= 0, (e < 0) & (e > -300)
    r[up] = np.round(v[up] / 10.0 ** e[up]) * 10.0 ** e[up]
    r[down] = np.round(v[down] * 10.0 ** -e[down]) / 10.0 ** -e[down]
    out[ok] = r
    return out


def _nulls(x: list) -> list:
    return [None if v != v or v in (math.inf, -math.inf) else v for v in x]


def _sig(a: np.ndarray, digits: int = 3) -> list:
    """A column as a JSON list, ``digits`` significant digits, NaN -> null."""
    return _nulls(sig_round(a, digits).tolist())


def _ints(a: np.ndarray, fill: int = -1) -> list[int]:
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), a, fill).astype(np.int64).tolist()


def _script(path: Path, call: str, *args: Any) -> int:
    """Write ``BL.call(arg, ...);`` (JSON arguments, ASCII only); returns the size in bytes."""
    text = f"BL.{call}(" + ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=True,
                                               allow_nan=False) for a in args) + ");\n"
    path.write_text(text, encoding="ascii")
    return len(text)


def _index_of(names: list[str], vocab: list[str], none: int = -1) -> list[int]:
    lookup = {v: i for i, v in enumerate(vocab)}
    return [lookup.get(x, none) for x in names]


def _embedding(run: Path, layer: str, n: int) -> tuple[list, list] | None:
    """analysis/embedding_<layer>.npy scaled to integers 0..1000 (NaN rows: null)."""
    path = run / "analysis" / f"embedding_{layer}.npy"
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
    return _ints(s[:, 0], -1), _ints(1000 - s[:, 1], -1)  # y grows downwards on a canvas


class Assets:
    """Copies images into ``assets/img`` once each and hands out their relative URLs."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[Path, str | None] = {}

    def thumbnail(self, src: Path, name: str, px: int) -> str | None:
        if src in self.done:
            return self.done[src]
        from PIL import Image

        try:
            with Image.open(src) as im:
                im.load()
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - an undecodable file is left out (the page says so)
            self.done[src] = None
            return None
        img.thumbnail((px, px))
        out = self.root / "img" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, format="PNG", optimize=True)
        self.done[src] = f"assets/img/{out.name}"
        return self.done[src]

    def unique(self, src: Path, prefix: str) -> str | None:
        """Copy an image under a name from its content (the same held-out image in five
        layers' galleries is one file); None when it does not decode."""
        import hashlib
        import io

        from PIL import Image

        if src in self.done:
            return self.done[src]
        try:
            if src.stat().st_size > MAX_IMAGE_BYTES:
                raise ValueError("too large for an example image")
            data = src.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
                ext = {"JPEG": ".jpg", "PNG": ".png"}.get(im.format or "")
        except Exception:  # noqa: BLE001 - an unreadable file is left out (the page says so)
            ext = None
        if ext is None:
            self.done[src] = None
            return None
        name = f"{prefix}{hashlib.sha256(data).hexdigest()[:20]}{ext}"
        out = self.root / "img" / name
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        self.done[src] = f"assets/img/{name}"
        return self.done[src]

    def copy(self, src: Path, name: str) -> str | None:
        if src in self.done:
            return self.done[src]
        out = self.root / "img" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, out)
        except OSError:
            self.done[src] = None
            return None
        self.done[src] = f"assets/img/{name}"
        return self.done[src]


def sprite_examples(run: Path, layer: str) -> dict | None:
    """The examples stage's sprite index and top table of ``layer`` (None when absent)."""
    d = run / "viz" / "examples" / layer
    idx_path, top_path = d / "sprites.json", d / "top.safetensors"
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


def gallery_examples(ctx: ReportContext, layer: str) -> dict | None:
    """The examples stage's gallery of ``layer`` as numpy arrays, checked for consistency (None
    when absent; a note when unreadable or inconsistent, e.g. edited by hand)."""
    from branchlens.viz.sprites import GALLERY, load_gallery

    d = ctx.run_dir / "viz" / "examples" / layer
    if not (d / GALLERY).is_file():
        return None
    try:
        doc, t = load_gallery(d)
        g = _checked_gallery(doc, {k: v.numpy() for k, v in t.items()})
    except Exception as e:  # noqa: BLE001 - the page goes on without crops and says why
        from branchlens.report.builder import shell_command

        again = shell_command("branchlens", "examples", ctx.run_dir, "--layer", layer)
        ctx.notes.append(f"{layer}: the examples gallery is unreadable ({type(e).__name__}: "
                         f"{e}); re-run {again}")
        return None
    g["dir"] = d
    return g


def _checked_gallery(doc: dict, t: dict[str, np.ndarray]) -> dict:
    """Shapes, ranges and types of a gallery; raises ValueError naming the first problem."""
    imgs = t["images"]
    n, k = imgs.shape
    h, w = (int(x) for x in doc["grid"])
    rf = doc["receptive_field"]
    geo = [float(rf["size"]), float(rf["stride"]), float(rf["offset"]), float(doc["image_size"])]
    if not (h > 0 and w > 0 and all(math.isfinite(x) for x in geo) and geo[0] > 0
            and geo[1] > 0 and geo[3] > 0):
        raise ValueError("bad grid, receptive field or image size")
    for key in ("ys", "xs", "values"):
        if t[key].shape != (n, k):
            raise ValueError(f"{key} is {t[key].shape}, images {imgs.shape}")
    off, pos = t["offsets"].astype(np.int64), t["pos"].astype(np.int64)
    if off.shape != (n * k + 1,) or off[0] != 0 or (np.diff(off) < 0).any() \
            or off[-1] != pos.size or t["val"].shape != pos.shape:
        raise ValueError("map offsets do not match the maps")
    used = imgs >= 0
    if (pos < 0).any() or (pos >= h * w).any() or (t["ys"][used] < 0).any() \
            or (t["ys"][used] >= h).any() or (t["xs"][used] < 0).any() \
            or (t["xs"][used] >= w).any() or not np.isfinite(t["values"]).all() \
            or not np.isfinite(t["val"].astype(np.float64)).all():
        raise ValueError("a unit or value out of range")
    records = {}
    for r in doc["image_files"]:
        lab = r.get("label")
        if not (isinstance(r["index"], int) and isinstance(r["file"], str)
                and isinstance(r["id"], str)
                and (lab is None or (isinstance(lab, int) and not isinstance(lab, bool)))):
            raise ValueError(f"bad image record {str(r)[:80]}")
        records[r["index"]] = r
    return {"doc": doc, "images": imgs, "ys": t["ys"], "xs": t["xs"],
            "values": t["values"].astype(np.float64), "offsets": off, "pos": pos,
            "val": t["val"].astype(np.float64), "grid": (h, w), "records": records,
            "geometry": geo}


def _map_codes(g: dict) -> tuple[str, int]:
    """Every entry's map as base64url text: per nonzero unit its flat position (``pw`` digits)
    and its value in 1..MAP_LEVELS of the latent's best example. Returns (text, pw); entry e
    is ``text[(pw + 1) * offsets[e]:(pw + 1) * offsets[e + 1]]``."""
    h, w = g["grid"]
    pw = 2 if h * w <= 64 ** 2 else 3
    n, k = g["images"].shape
    per = np.diff(g["offsets"])
    latent = np.repeat(np.arange(n * k), per) // k
    vmax = np.maximum(g["values"].max(1), 1e-12)[latent]
    q = np.clip(np.rint(g["val"] / vmax * MAP_LEVELS), 1, MAP_LEVELS).astype(np.int64)
    digits = [(g["pos"] // 64 ** (pw - 1 - d)) % 64 for d in range(pw)] + [q]
    return B64[np.stack(digits, 1)].tobytes().decode("ascii"), pw


def write_gallery(ctx: ReportContext, li: int, g: dict, data_dir: Path, assets: Assets,
                  labels: list[str]) -> dict:
    """Gallery chunks ``g<li>_<c>.js`` of one layer and its images; returns the layer's
    gallery meta (geometry for drawing the crops, bytes written)."""
    text, pw = _map_codes(g)
    step = pw + 1
    urls: dict[int, list | None] = {}
    shown = set(np.unique(g["images"][g["images"] >= 0]).tolist())
    for i, r in g["records"].items():
        if i not in shown:
            continue
        path = find_run_image(g["dir"], r["file"], ctx.run_dir)  # confined to the run
        url = assets.unique(path, "g") if path is not None else None
        lab = r["label"]
        urls[i] = None if url is None else [
            url, r["id"], labels[lab] if lab is not None and 0 <= lab < len(labels) else ""]
    images, ys, xs, values, off = g["images"], g["ys"], g["xs"], g["values"], g["offsets"]
    n, k = images.shape
    size = missing = chunks = 0
    for c0 in range(0, n, GALLERY_CHUNK):
        local: dict[int, int] = {}
        table: list[list] = []
        items = []
        for j in range(c0, min(n, c0 + GALLERY_CHUNK)):
            row = []
            for s in range(k):
                i = int(images[j, s])
                if i < 0:
                    break
                if urls.get(i) is None:
                    missing += 1
                    continue
                if i not in local:
                    local[i] = len(table)
                    table.append(urls[i])
                e = j * k + s
                row.append([local[i], int(ys[j, s]), int(xs[j, s]), _f(values[j, s]),
                            text[step * off[e]:step * off[e + 1]]])
            items.append(row)
        size += _script(data_dir / f"g{li}_{c0 // GALLERY_CHUNK}.js", "gallery", li,
                        c0 // GALLERY_CHUNK, {"i": table, "e": items})
        chunks += 1
    if missing:
        ctx.notes.append(f"{g['dir'].name}: {missing} gallery example(s) left out: "
                         "their image file is missing, outside the run or unreadable")
    rfs, stride, offset, image = g["geometry"]
    img_bytes = sum((assets.root / u[0].split("/", 1)[1]).stat().st_size  # "assets/img/…"
                    for u in urls.values() if u)
    from branchlens.viz.examples import OVERLAY_ALPHA, OVERLAY_RED

    return {"rf": [rfs, stride, offset], "image": image, "grid": list(g["grid"]), "k": k,
            "chunk": GALLERY_CHUNK, "chunks": chunks, "pw": pw, "levels": MAP_LEVELS,
            "alpha": OVERLAY_ALPHA, "red": [round(255 * c) for c in OVERLAY_RED],
            "bytes": size, "image_bytes": img_bytes, "images": sum(1 for u in urls.values() if u)}


def layer_effects(run_dir: Path, layer: str) -> dict[int, list[str]] | None:
    """{latent: [promotes, suppresses]} from the effects stage's table of ``layer``, or None
    when the stage has not run (a malformed row is left out, never guessed)."""
    import csv

    from branchlens.run import Run

    path = Run(run_dir).effects_table_path(layer)
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
    dec = geometry.load_decoder(ctx.run_dir / "sae" / layer) if layer in ctx.saes else None
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
        "alive": _ints(alive), "rate": _sig(cols.f("firing_rate")),
        "nimg": _ints(cols.f("n_images_fired"), 0),
        "dom": _index_of([d or "none" for d in cols.s("dominant")], doms, len(doms) - 1),
        "rdom": _index_of([d or "none" for d in cols.s("robust_dominant")], doms,
                          len(doms) - 1),
        "cat": _index_of(cols.s("top_category"), cats, -1),
    }
    sr, ss = np.zeros(n, np.int64), np.zeros(n, np.int64)  # bit b: q of branch b <= q
    for bi, b in enumerate(branches):
        t[f"r{bi}"] = _round(cols.f(f"paper_ratio_{b}"), 3)
        t[f"qr{bi}"] = _sig(cols.f(f"q_raw_{b}"), 2)
        t[f"qs{bi}"] = _sig(cols.f(f"q_scale_{b}"), 2)
        with np.errstate(invalid="ignore"):
            sr |= (cols.f(f"q_raw_{b}") <= q).astype(np.int64) << bi
            ss |= (cols.f(f"q_scale_{b}") <= q).astype(np.int64) << bi
    t["sr"], t["ss"] = sr.tolist(), ss.tolist()  # exact decisions; q columns are rounded
    emb = _embedding(ctx.run_dir, layer, n)
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
    t["ex"], t["fv"] = _ints(has_ex), _ints(has_fv)
    size = _script(data_dir / f"t{li}.js", "table", li, t)

    labels = _class_names(ctx.variant)
    gmeta = write_gallery(ctx, li, gal, data_dir, assets, labels) if gal is not None else None
    pre = {key: [_nulls(r) for r in sig_round(np.stack(
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
        size += _script(data_dir / f"d{li}_{c0 // CHUNK}.js", "detail", li, c0 // CHUNK, items)
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
                       "v": _sig(vals[:k])}
    if lv is not None:
        fv = [(cap, assets.thumbnail(p, f"fv{li}_{j}_{i}", FEATUREVIS_PX))
              for i, (cap, p) in enumerate(lv.featurevis)]
        d["fv"] = [[cap, src] for cap, src in fv]  # src None: unreadable file
        if lv.examples:  # full-size strips (evidence latents): shown instead of the sprites
            d["strips"] = [[cap, assets.copy(p, f"st{li}_{j}_{i}{p.suffix.lower()}")]
                           for i, (cap, p) in enumerate(lv.examples)]
        if lv.upstream:
            d["up"] = [[u.get("layer"), u["latent"], _f(u.get("score")), _f(u.get("share")),
                        u.get("dominant")] for u in lv.upstream[:10]]
            d["err"] = _f(lv.upstream[0].get("error_share"))
    return d


def _f(x: Any) -> float | None:
    return float(f"{x:.3g}") if isinstance(x, int | float) and math.isfinite(x) else None


def _label(s: str, names: list[str]) -> str:
    try:
        i = int(s)
    except ValueError:
        return ""
    return names[i] if 0 <= i < len(names) else ""
