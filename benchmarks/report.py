"""Report of a 16×-scale run: build time, size, first render and opening a latent in Chromium.

A synthetic run in the stages' artifact formats (tests/_report_run.py: five layers mixed4a–4e
with 8,192–13,312 latents, 46,336 in all; SAE decoders, latents.csv, summary, embeddings,
the examples galleries the examples stage writes (200 held-out images, 12 per latent, each
latent's map on each as sparse units; ``--examples sprites``: the sprite sheets of earlier
versions), and the claim galleries' evidence pictures and 12 × 128 px strips as the sample16x
preset renders them) is reported twice:

- ours: the report folder (index.html + per-layer data scripts + lazily loaded detail and
  gallery chunks and images) of this checkout;
- baseline: the single-file report builder exactly as it was at commit ed95b4d (its files are
  read from git and imported under another package name, unchanged otherwise), asked for a
  card per latent (``cards_per_layer`` = the largest layer) so that it too shows every latent.
  It embeds no crops (it has no way to show them for every latent), so its size is text only.

First render = navigation start until the browser is usable (ours: ``BL.ready``; baseline:
the load event, after its script sorted the cards). Opening a latent = from the click (hash
change) until its page is drawn, detail chunk loaded from disk (median of several), and until
its 12 example crops are drawn (gallery chunk, images, overlays). Examples bytes per layer: the
gallery chunks and the held-out images the layer shows (copied once for all layers). The claim
galleries are measured in ours: how many of their images the first render fetched (lazy, inside
closed <details>: should be none) and how long opening the first gallery takes.

    python benchmarks/report.py [--out /tmp/branchlens-report-bench] [--no-baseline]
                                [--layers mixed4c] [--examples gallery|sprites|none]

Ends with ``RESULT report_first_render_every_latent ours=<s> baseline=<s> unit=s ratio=<x>``
(``report_build_every_latent`` when Chromium is unavailable or skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _report_run import SIXTEEN_X, add_gallery, add_sprites, make_run  # noqa: E402

BASELINE_COMMIT = "ed95b4d"
OLD_FILES = ("__init__.py", "builder.py", "gallery.py", "images.py", "sections.py",
             "report.css", "report.js", "template.html")


def add_evidence(run: Path, per_cell: int = 2, pairs: int = 2, px: int = 128,
                 n_examples: int = 12, seed: int = 0) -> int:
    """What ``visualize --select evidence`` and ``examples --select evidence`` write (as the
    sample16x preset runs them): per layer the best latents of each branch cell and of the
    matched pairs, a full and a branch-restricted picture each, a full-size examples strip
    (``n_examples`` crops of ``px``) and ``evidence.json``. Returns the number of pictures."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    layers = summary["layers"]
    total = 0
    prev_pairs: list[dict] = []

    def picture(path: Path, w: int, h: int) -> None:
        small = rng.integers(0, 255, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)

    for li, layer in enumerate(layers):
        branches = list(summary["per_layer"][layer]["branch_slices"])
        fv = run / "viz" / "featurevis" / layer
        ex = run / "viz" / "examples" / layer
        fv.mkdir(parents=True, exist_ok=True)
        ex.mkdir(parents=True, exist_ok=True)
        cells = {b: [int(x) for x in rng.choice(1000, per_cell, replace=False)]
                 for b in branches}
        pair_list = [{"up": layer, "down": layers[li + 1], "a": int(rng.integers(1000)),
                      "b": int(rng.integers(1000)), "corr": 0.8}
                     for _ in range(pairs)] if li + 1 < len(layers) else []
        mine = sorted({j for js in cells.values() for j in js} | {p["a"] for p in pair_list})
        mine = sorted(set(mine) | {p["b"] for p in prev_pairs})  # the previous pairs' down side
        pictures, entries = {}, []
        for j in mine:
            own = next((b for b, js in cells.items() if j in js), None)
            full = f"{layer}_{j:05d}_latent.png"
            picture(fv / full, px, px)
            pictures[str(j)] = {"full": full}
            total += 1
            if own:
                part = f"{layer}_{j:05d}_latent_{own}.png"
                picture(fv / part, px, px)
                pictures[str(j)][own] = part
                total += 1
            strip = f"{layer}_{j:05d}.png"
            picture(ex / strip, px * n_examples, px)
            ids = rng.integers(0, 1000, n_examples)
            entries.append({"latent": j, "file": strip, "examples": [
                {"image_id": f"n{i:08d}_class{i}.JPEG"} for i in ids]})
        prev_pairs = pair_list
        (fv / "evidence.json").write_text(json.dumps(
            {"layer": layer, "objective": "latent", "cells": cells, "pairs": pair_list,
             "pictures": pictures}))
        (ex / "index.json").write_text(json.dumps({"layer": layer, "latents": entries}))
    from branchlens.analysis.claims import CLAIMS

    summary["claims"] = [{"id": cid, "claim": text, "verdict": "not testable",
                          "evidence": "synthetic run", "rule": "", "numbers": {}}
                         for cid, text in CLAIMS]  # the claims the galleries sit under
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    return total


def gallery_times(html: Path) -> dict:
    """First render with the claim galleries in the page, how many of their images that first
    render fetched (they are lazy, inside closed <details>), and opening the first gallery."""
    from _browser import wait_until

    with bench_page() as page:
        if page is None:
            return {}
        fetched: list[str] = []
        page.on("requestfinished", lambda r: fetched.append(r.url))
        page.goto(html.resolve().as_uri(), wait_until="load")
        wait_until(page, "() => window.BL && window.BL.ready === true")
        first = float(page.evaluate("window.BL.readyMs"))
        srcs = set(page.evaluate("Array.from(document.querySelectorAll('details.evidence img'))"
                                 ".map(i => i.src)"))
        at_first = sum(u in srcs for u in fetched)
        t0 = time.perf_counter()
        page.evaluate("document.querySelector('details.evidence').open = true")
        wait_until(page, "() => Array.from(document.querySelector('details.evidence')"
                         ".querySelectorAll('img')).slice(0, 8).every(i => i.complete && "
                         "i.naturalWidth > 0)")
        opened = (time.perf_counter() - t0) * 1e3
        galleries = int(page.evaluate("document.querySelectorAll('details.evidence').length"))
    return {"first_render_ms": first, "gallery_images": len(srcs),
            "fetched_at_first_render": at_first, "open_gallery_ms": opened,
            "galleries": galleries}


def old_builder(tmp: Path):
    """The report package of commit ed95b4d, importable as ``branchlens_report_ed95b4d``."""
    name = f"branchlens_report_{BASELINE_COMMIT}"
    pkg = tmp / name
    pkg.mkdir(parents=True, exist_ok=True)
    for f in OLD_FILES:
        try:
            text = subprocess.run(["git", "-C", str(ROOT), "show",
                                   f"{BASELINE_COMMIT}:src/branchlens/report/{f}"],
                                  check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"baseline needs the git history ({BASELINE_COMMIT}): {e}") from e
        (pkg / f).write_text(text.replace("branchlens.report", name))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def bench_page() -> Iterator[Any]:
    """A fresh headless Chromium page (None, said once, when Chromium is unavailable)."""
    from _browser import LAUNCH_ARGS, chromium_path, unavailable_reason

    why = unavailable_reason()
    if why:
        print(f"(no Chromium timings: {why})")
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(600_000)
        try:
            yield page
        finally:
            browser.close()


def chromium_times(html: Path, ours: bool, latents: list[tuple[str, int]],
                   crops: bool = False) -> dict:
    """First render; per probed latent the ms until its page (and with ``crops`` until its
    example crops) is drawn, and how many crops of >= 96 px it shows."""
    from _browser import open_crops, open_latent, wait_until

    with bench_page() as page:
        if page is None:
            return {}
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(html.resolve().as_uri(), wait_until="load")
        opens, crop_ms, shown = [], [], []
        if ours:
            wait_until(page, "() => window.BL && window.BL.ready === true")
            first = page.evaluate("window.BL.readyMs")
            for layer, j in latents:
                if crops:
                    a, b, cs = open_crops(page, layer, j)
                    crop_ms.append(b)
                    shown.append(sum(c["width"] >= 96 and not c["broken"] for c in cs))
                else:
                    a = open_latent(page, layer, j)
                opens.append(a)
        else:
            first = page.evaluate("performance.timing.loadEventEnd - "
                                  "performance.timing.navigationStart")
    return {"first_render_ms": float(first), "open_ms": opens, "crops_ms": crop_ms,
            "crops_shown": shown, "errors": errors}


def examples_bytes(run: Path, meta: dict) -> list[tuple[str, int, int, int]]:
    """Per layer: (name, gallery chunk bytes, bytes of the images it shows, bytes of the
    examples stage's gallery files in the run folder)."""
    out = []
    for lm in meta["layers"]:
        g = lm.get("gallery")
        if not g:
            continue
        d = run / "viz" / "examples" / lm["name"]
        stage = sum(p.stat().st_size for p in [d / "gallery_maps.safetensors",
                                               d / "gallery.json", *(d / "images").glob("*")])
        out.append((lm["name"], int(g["bytes"]), int(g["image_bytes"]), stage))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/branchlens-report-bench")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--examples", choices=("gallery", "sprites", "none"), default="gallery",
                    help="examples as this version writes them (gallery) or as earlier ones")
    ap.add_argument("--layers", default=",".join(SIXTEEN_X),
                    help="a subset of the five 16x layers (one layer: a quick measurement)")
    ap.add_argument("--no-evidence", action="store_true",
                    help="no claim galleries (evidence pictures and strips)")
    ap.add_argument("--no-baseline-browser", action="store_true",
                    help="skip loading the baseline's one big file in Chromium (slow)")
    args = ap.parse_args()
    from branchlens.report import build_report

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    layers = {name: SIXTEEN_X[name] for name in args.layers.split(",")}
    run = make_run(out / "run", layers)
    if args.examples == "sprites":
        add_sprites(run)
    elif args.examples == "gallery":
        add_gallery(run)
    pictures = 0 if args.no_evidence else add_evidence(run)
    n = sum(layers.values())
    print(f"synthetic run: {len(layers)} layers, {n} latents ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    html = build_report(run, out / "ours")
    t_ours = time.perf_counter() - t0
    size = folder_size(out / "ours")
    text = size - folder_size(out / "ours" / "assets" / "img") if (
        out / "ours" / "assets" / "img").is_dir() else size
    probe = [(name, j) for name, j in (("mixed4a", 17), ("mixed4c", 5000), ("mixed4e", 13311),
                                       ("mixed4b", 8191), ("mixed4d", 4242), ("mixed4c", 77),
                                       ("mixed4a", 6000)) if name in layers]
    ch = chromium_times(html, True, probe, crops=args.examples == "gallery")
    print(f"ours:     build {t_ours:6.1f} s, {size / 1e6:7.1f} MB ({text / 1e6:.1f} MB without "
          f"images), index.html {html.stat().st_size / 1e3:.0f} kB")
    meta = json.loads(html.read_text().split('id="bl-meta">', 1)[1].split("</script>", 1)[0])
    for name, chunks, images, stage in examples_bytes(run, meta):
        print(f"          examples {name}: report {(chunks + images) / 1e6:.1f} MB (gallery "
              f"chunks {chunks / 1e6:.1f} MB, {images / 1e6:.1f} MB images), run folder "
              f"{stage / 1e6:.1f} MB")
    if ch:
        print(f"          first render {ch['first_render_ms']:.0f} ms, open a latent median "
              f"{statistics.median(ch['open_ms']):.0f} ms (max {max(ch['open_ms']):.0f}), "
              f"page errors {len(ch['errors'])}")
    if ch and ch["crops_ms"]:
        print(f"          open a latent and draw its crops: median "
              f"{statistics.median(ch['crops_ms']):.0f} ms (max {max(ch['crops_ms']):.0f}), "
              f"crops >= 96 px shown {min(ch['crops_shown'])}-{max(ch['crops_shown'])}")
    gal = gallery_times(html) if pictures else {}
    if gal:
        print(f"          claim galleries: {gal['galleries']} galleries, "
              f"{gal['gallery_images']} images ({pictures} pictures + strips); fetched at first "
              f"render {gal['fetched_at_first_render']}; first render "
              f"{gal['first_render_ms']:.0f} ms; open the first gallery "
              f"{gal['open_gallery_ms']:.0f} ms")
    if args.no_baseline:
        print(f"RESULT report_build_every_latent ours={t_ours:.1f} baseline=nan unit=s "
              "ratio=nan")
        return
    old = old_builder(out / "old")
    per_layer = max(layers.values())
    t0 = time.perf_counter()
    base_html = old.build_report(run, out / "baseline" / "index.html",
                                 cards_per_layer=per_layer)
    t_base = time.perf_counter() - t0
    bsize = base_html.stat().st_size
    print(f"(baseline built in {t_base:.1f} s; loading its single file in Chromium)", flush=True)
    bch = {} if args.no_baseline_browser else chromium_times(base_html, False, [])
    cards = base_html.read_text().count('class="card"')
    print(f"baseline: build {t_base:6.1f} s, {bsize / 1e6:7.1f} MB (one file, no crops), "
          f"{cards} cards")
    if bch:
        print(f"          first render {bch['first_render_ms']:.0f} ms, open a latent: scroll "
              f"(all cards in the DOM), page errors {len(bch['errors'])}")
    print(f"size: ours {text / 1e6:.1f} MB text + {(size - text) / 1e6:.1f} MB crops vs "
          f"baseline {bsize / 1e6:.1f} MB text")
    print(f"build: ours {t_ours:.1f} s vs baseline {t_base:.1f} s")
    if ch and bch:
        a, b = ch["first_render_ms"] / 1e3, bch["first_render_ms"] / 1e3
        print(f"RESULT report_first_render_every_latent ours={a:.2f} baseline={b:.1f} unit=s "
              f"ratio={b / a:.1f}")
    else:
        print(f"RESULT report_build_every_latent ours={t_ours:.1f} baseline={t_base:.1f} unit=s "
              f"ratio={t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()
