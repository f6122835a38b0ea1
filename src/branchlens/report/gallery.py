"""The examples gallery of the latent browser: the examples stage's crops as data chunks.

Per latent its examples as image, unit, value and the latent's map on that image in a few
characters (``BL.gallery(...)``, ``GALLERY_CHUNK`` latents per file, loaded when a latent is
opened); the page draws each receptive-field crop from the held-out image, copied once whatever
number of latents and layers show it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from branchlens.report.assets import Assets, short, write_script
from branchlens.report.builder import ReportContext, find_run_image, shell_command

GALLERY_CHUNK = 64  # latents per gallery file: opening one latent fetches ~50-100 kB
GALLERY_PX = 112  # CSS pixels of one example crop on the latent page (>= 96)
MAP_LEVELS = 63  # a map value is sent as one base64url digit, 1..63 of the latent's best value
B64 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8)


def gallery_examples(ctx: ReportContext, layer: str) -> dict | None:
    """The examples stage's gallery of ``layer`` as numpy arrays, checked for consistency (None
    when absent; a note when unreadable or inconsistent, e.g. edited by hand)."""
    from branchlens.viz.sprites import GALLERY, load_gallery

    d = ctx.layout.examples_dir(layer)
    if not (d / GALLERY).is_file():
        return None
    try:
        doc, t = load_gallery(d)
        g = _checked_gallery(doc, {k: v.numpy() for k, v in t.items()})
    except Exception as e:  # noqa: BLE001 - the page goes on without crops and says why
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
                row.append([local[i], int(ys[j, s]), int(xs[j, s]), short(values[j, s]),
                            text[step * off[e]:step * off[e + 1]]])
            items.append(row)
        size += write_script(data_dir / f"g{li}_{c0 // GALLERY_CHUNK}.js", "gallery", li,
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
