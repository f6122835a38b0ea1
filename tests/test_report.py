"""The report folder on a small but complete run made by the real stages, and on a synthetic
40k-latent run, checked for values and in real Chromium.

The run fixture calls the stages' own entry points (harvest -> store/, train_layers -> sae/,
analyze -> analysis/, visualize_stage / examples_stage / circuits_stage -> viz/) on 7 tiny
images with random weights, so the report reads exactly the formats a real run writes. Image
file names, one category label and (in the synthetic run) a layer name carry HTML/JS payloads.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _browser import wait_until
from _report_run import add_gallery, add_sprites, make_run
from branchlens.analysis.table import read_latent_table
from branchlens.report import build_report
from branchlens.report.builder import gather
from branchlens.report.geometry import paper_ratios

LAYERS = ["mixed3a", "mixed3b"]
EVIL = "<script>alert(1)</script>"
EVIL_FILE = "n02085620_<img src=x onerror=alert(2)>.png"  # undecodable -> a skipped file
WNIDS = ["n02085620", "n01440764", "n04037443", "n07753592"]  # dog, fish, artifact, food


def _images(root: Path) -> Path:
    imgs = root / "imgs"
    (imgs / "<script>alert(1)<").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        a[10 + i:30 + i, 8:40] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(imgs / f"{WNIDS[i % 4]}_{i:02d}.png")
    # image id "imgs/<script>alert(1)</script>.png"
    Image.fromarray(a[::-1]).save(imgs / "<script>alert(1)<" / "script>.png")
    (imgs / EVIL_FILE).write_bytes(b"not an image")
    return imgs


def _plant_branches(run: Path, layer: str, n: int = 40) -> None:
    """Put some decoder rows entirely into one branch each (in std-normalised units, the
    analysis' decision scale), so the analysis finds latents dominant in every branch."""
    from branchlens.sae import TopKSAE
    from branchlens.store import ActivationStore

    std = torch.as_tensor(ActivationStore.open(run / "store").layer_stats(layer)["std"]).float()
    sae = TopKSAE.load(run / "sae" / layer)
    slices = list(sae.cfg.branch_slices.values())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        W = sae.W_dec
        for i in range(n):
            a, b = slices[i % len(slices)]
            W[i] = 0.0
            W[i, a:b] = std[a:b] * torch.randn(b - a, generator=gen).abs()
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))
    sae.save(run / "sae" / layer, sae.meta)


def _set_category(run: Path, row_index: int, value: str) -> None:
    """Give one latent a hostile category label (the CSV format is the analysis stage's)."""
    path = run / "analysis" / "latents.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row_index]["top_category"] = value
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from branchlens.analysis import AnalysisConfig, analyze
    from branchlens.harvest import harvest
    from branchlens.sae import TopKSAE
    from branchlens.train import TrainConfig, train_layers
    from branchlens.viz.stages import circuits_stage, examples_stage, visualize_stage

    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    imgs = _images(root)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        harvest(str(imgs), run / "store", LAYERS, weights="random", device="cpu",
                samples_per_image=16, aligned=True, batch_size=8, workers=0,
                show_progress=False)
    train_layers(run, LAYERS, {"k": 8}, TrainConfig(
        batch_size=32, steps=12, log_every=4, warmup_steps=2, init_sample=256, progress=False),
        expansion=1)
    _plant_branches(run, "mixed3b")
    analyze(run, config=AnalysisConfig(n_perm=200, embed="pca", curve_reps=20, bootstrap=100,
                                       min_images=2, top=8, top_images=4))
    _set_category(run, 3, EVIL)
    # run.json as `branchlens run` records it (config, versions, per-stage status)
    from branchlens.artifacts import provenance, write_json
    from branchlens.pipeline import make_config

    write_json(run / "run.json", provenance(
        config=make_config("demo", source=str(imgs)), weights="random", device="cpu",
        stages={"harvest": {"status": "done", "seconds": 1.5},
                "visualize": {"status": "failed", "error": f"ValueError: {EVIL}"}}))

    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        # one layer each keeps the test fast; each stage loads the model and runs it
        alive = (~TopKSAE.load(run / "sae" / "mixed3a").dead_mask()).nonzero().squeeze(1)
        visualize_stage(run, "mixed3a", alive[:4].tolist(), size=48, steps=2,
                        weights="random", device="cpu", show_progress=False)
        # the latents the claims rest on (the planted mixed3b cells), full and per branch
        visualize_stage(run, "mixed3b", select="evidence", n_latents=6, per_cell=2, pairs=1,
                        size=32, steps=1, weights="random", device="cpu", show_progress=False)
        ex = run / "viz" / "examples" / "mixed3b"  # what a killed earlier call left there
        (ex / "tmpa1b2c3").mkdir(parents=True)
        (ex / "tmpa1b2c3" / "tiles.npy").write_bytes(b"\0" * 64)
        (ex / ".top.safetensors.x7y8z9_q.tmp").write_bytes(b"half")
        examples_stage(run, "mixed3b", n_top=4, n_strips=4, select="evidence", per_cell=2,
                       pairs=1, batch_size=8, weights="random", device="cpu",
                       show_progress=False, heldout=False)
        circuits_stage(run, "mixed3a", "mixed3b", latents=[0, 1, 2, 3], n_images=2,
                       flow_latents=4, n_perm=50, top_k=5, ablate=2, weights="random",
                       device="cpu", batch_size=8, show_progress=False)
    return run



def test_claims_show_the_latents_they_rest_on(real_run: Path) -> None:
    """Each claim's gallery holds exactly the evidence latents the visualize stage chose, their
    pictures (full and branch-restricted) decode, and each tile links to the latent's page."""
    ev = json.loads((real_run / "viz" / "featurevis" / "mixed3b" / "evidence.json").read_text())
    rows = {r["latent"]: r for r in read_latent_table(real_run / "analysis" / "latents.csv",
                                                      "mixed3b")}
    assert ev["cells"], "planted branches give robust cells"
    for b, js in ev["cells"].items():
        assert all(rows[j]["robust_dominant"] == b for j in js)
        assert all(set(ev["pictures"][str(j)]) >= {"full", b} for j in js)
    out = build_report(real_run)
    page = out.read_text()
    claims = page[page.index('<section id="claims">'):page.index("</section>",
                                                                 page.index('id="claims"'))]
    assert '<details class="evidence">' in claims
    for js in ev["cells"].values():
        for j in js:
            assert f'href="#latent/mixed3b/{j}"' in claims
    tiles = re.findall(r'<a class="ev"[^>]*>(.*?)</a>', claims, re.S)
    pics = [m for t in tiles for m in re.findall(r'<img loading="lazy" src="([^"]+)"', t)]
    assert pics and all(Image.open(out.parent / html.unescape(i)).size == (32, 32) for i in pics)
    # the examples strip of an evidence latent that has one (the fixture drew strips of the
    # evidence latents first)
    strips = [m for t in tiles for m in re.findall(r'<img class="strip" loading="lazy" '
                                                    r'src="([^"]+)"', t)]
    drawn = {e["latent"] for e in json.loads((real_run / "viz" / "examples" / "mixed3b" /
                                               "index.json").read_text())["latents"]}
    with_strip = {j for js in ev["cells"].values() for j in js} & drawn
    assert len(set(strips)) == len(with_strip)
    assert all(Image.open(out.parent / html.unescape(i)).height == 128 for i in strips)
    # each strip's images by name, best first, as the examples index lists them
    ex = json.loads((real_run / "viz" / "examples" / "mixed3b" / "index.json").read_text())
    from branchlens.report.evidence import short_name

    assert with_strip
    for e in ex["latents"]:
        if e["latent"] in with_strip:  # each name isolated (a bidi control cannot reorder)
            names = " · ".join(f"<bdi>{html.escape(short_name(x['image_id']))}</bdi>"
                               for x in e["examples"][:6])
            assert f"top: {names}" in claims
    assert short_name("imagenet-sample/n01440764_tench.JPEG#flip") == "tench"


def _call(path: Path) -> list:
    """The arguments of a data script ``BL.name(a, b, ...);`` (JSON)."""
    text = path.read_text(encoding="ascii")
    m = re.fullmatch(r"BL\.(table|detail|gallery)\((.*)\);\n", text, re.S)
    assert m, text[:80]
    return json.loads(f"[{m.group(2)}]")


def _meta(index: Path) -> dict:
    m = re.search(r'<script type="application/json" id="bl-meta">(.*?)</script>',
                  index.read_text(), re.S)
    return json.loads(m.group(1))


def _detail(report: Path, meta: dict, layer: str, j: int) -> dict:
    li = [x["name"] for x in meta["layers"]].index(layer)
    chunk = meta["layers"][li]["chunk"]
    _, c, items = _call(report / "assets" / "data" / f"d{li}_{j // chunk}.js")
    assert c == j // chunk
    return items[j % chunk]


def _csv_rows(run: Path) -> dict[tuple[str, int], dict]:
    with open(run / "analysis" / "latents.csv", newline="") as f:
        return {(r["layer"], int(r["latent"])): r for r in csv.DictReader(f)}


def _gallery(report: Path, meta: dict, layer: str, j: int) -> list[dict]:
    """The examples of latent j as its gallery chunk sends them to the page."""
    li = [x["name"] for x in meta["layers"]].index(layer)
    g = meta["layers"][li]["gallery"]
    _, c, chunk = _call(report / "assets" / "data" / f"g{li}_{j // g['chunk']}.js")
    assert c == j // g["chunk"]
    return [dict(zip(("url", "id", "cls"), chunk["i"][e[0]], strict=True))
            | {"y": e[1], "x": e[2], "value": e[3], "map": e[4]}
            for e in chunk["e"][j % g["chunk"]]]


def _decode_map(code: str, g: dict) -> np.ndarray:
    """The page's reading of a map string: values in [0, 1] of the latent's best example."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    h, w = g["grid"]
    m = np.zeros(h * w)
    step = g["pw"] + 1
    for k in range(0, len(code), step):
        pos = 0
        for ch in code[k:k + g["pw"]]:
            pos = pos * 64 + alphabet.index(ch)
        m[pos] = alphabet.index(code[k + g["pw"]]) / g["levels"]
    return m.reshape(h, w)


def _check_gallery(run: Path, out: Path, meta: dict, layer: str, t: dict) -> None:
    """The gallery chunks send exactly the examples stage's gallery: each latent's examples
    (image, class, unit, value) in order, its maps to 1/63 of its best value, each held-out
    image copied once."""
    from branchlens.variants import class_names
    from branchlens.viz.sprites import entry_map, load_gallery

    doc, gt = load_gallery(run / "viz" / "examples" / layer)
    g = next(x for x in meta["layers"] if x["name"] == layer)["gallery"]
    rf = doc["receptive_field"]
    assert g["rf"] == [rf["size"], rf["stride"], rf["offset"]] and g["grid"] == doc["grid"]
    assert g["image"] == 224 and g["k"] == doc["size"] == 12
    records = {r["index"]: r for r in doc["image_files"]}
    names = class_names("bvlc_googlenet")
    n = gt["images"].shape[0]
    firing = [j for j in range(n) if gt["images"][j, 0] >= 0]
    assert len(firing) == doc["with_examples"] > 0
    assert all(t["ex"][j] for j in firing) and sum(t["ex"]) <= len(firing) + 4  # + strips
    urls = {}
    for j in firing:
        shown = _gallery(out.parent, meta, layer, j)
        slots = [s for s in range(12) if gt["images"][j, s] >= 0]
        assert len(shown) == len(slots)
        vmax = float(gt["values"][j].max())
        for s, e in zip(slots, shown, strict=True):
            r = records[int(gt["images"][j, s])]
            assert e["id"] == r["id"] and (e["y"], e["x"]) == (int(gt["ys"][j, s]),
                                                               int(gt["xs"][j, s]))
            assert e["cls"] == (names[r["label"]] if r["label"] is not None else "")
            assert e["value"] == pytest.approx(float(gt["values"][j, s]), rel=5e-3)  # 3 digits
            want = entry_map(gt, doc["grid"], j, s).numpy() / vmax
            assert np.abs(_decode_map(e["map"], g) - want).max() <= 1 / 63  # (tiny: 1/63)
            assert (_decode_map(e["map"], g) > 0).sum() == (want > 0).sum()
            urls.setdefault(r["id"], set()).add(e["url"])
    assert all(len(u) == 1 for u in urls.values())  # one file per held-out image
    files = {u for us in urls.values() for u in us}
    assert files == {f"assets/img/{p.name}" for p in (out.parent / "assets" / "img").glob("g*")}


def test_report_folder_from_real_run(real_run: Path) -> None:
    from branchlens.sae import TopKSAE

    out = build_report(real_run)
    assert out == real_run / "report" / "index.html"
    page = out.read_text()
    # offline: CSP forbids the network; every script and image is a file in assets/
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in html.unescape(csp) and "script-src 'self'" in \
        html.unescape(csp)
    for bad in ("http:", "https:", "url(", "@import", "<script>"):
        assert bad not in page
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert refs and all(r.startswith("assets/") and (out.parent / r).is_file() for r in refs)
    assert "RANDOM WEIGHTS" in page and "Stages (run.json)" in page
    assert EVIL not in page and "ValueError: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "mixed3a ↔ mixed3b" in page and 'class="flow"' in page  # overview sections
    # every stage ran; examples only for mixed3b, so mixed3a's crops name their command
    assert page.count("not available") == 1
    assert f"examples not available: run <code>branchlens examples {real_run} --layer mixed3a" \
        in page

    meta = _meta(out)
    rows = _csv_rows(real_run)
    names = [x["name"] for x in meta["layers"]]
    assert names == LAYERS
    ctx = gather(real_run)
    assert ctx.random_weights and ctx.variant == "bvlc_googlenet" and not ctx.notes
    for li, layer in enumerate(LAYERS):
        sae = TopKSAE.load(real_run / "sae" / layer)
        dec = sae.decoder_directions().numpy()
        n = dec.shape[0]
        lm = meta["layers"][li]
        assert lm["n"] == n and lm["chunks"] == -(-n // lm["chunk"])
        _, t = _call(out.parent / "assets" / "data" / f"t{li}.js")
        br = lm["branches"]
        for j in range(n):  # the table is the analysis' columns, not a re-decision
            r = rows[(layer, j)]
            assert lm["doms"][t["dom"][j]] == r["dominant"]
            assert lm["doms"][t["rdom"][j]] == r["robust_dominant"]
            assert t["alive"][j] == (r["alive"] == "True")
            for bi, b in enumerate(br):
                q = r[f"q_raw_{b}"]
                assert (t[f"qr{bi}"][j] is None) == (q == "")
                assert (t["sr"][j] >> bi) & 1 == (q != "" and float(q) <= meta["q"])
                if q:
                    assert t[f"qr{bi}"][j] == pytest.approx(float(q), rel=0.06, abs=1e-12)
                ratio = float(r[f"paper_ratio_{b}"] or "nan")
                if ratio == ratio:
                    assert t[f"r{bi}"][j] == pytest.approx(ratio, abs=6e-4)
                else:
                    assert t[f"r{bi}"][j] is None
        # the report's own paper ratio (null band) agrees with the analysis' definition
        pr = paper_ratios(dec, ctx.slices(layer))
        alive = [j for j in range(n) if rows[(layer, j)]["alive"] == "True"]
        assert np.allclose(pr[alive], [[float(rows[(layer, j)][f"paper_ratio_{b}"])
                                        for b in br] for j in alive], atol=1e-4)
        # neighbours: the most cosine-similar other alive decoder row
        u = dec / np.linalg.norm(dec, axis=1, keepdims=True)
        for j in alive[:5]:
            d = _detail(out.parent, meta, layer, j)
            sim = u[alive] @ u[j]
            sim[alive.index(j)] = -np.inf
            assert d["nb"][0] == alive[int(np.argmax(sim))]
            assert all(lo <= hi for lo, hi in d["band"])
            assert d["pr"] == [pytest.approx(float(rows[(layer, j)][f"p_raw_{b}"]), rel=0.01)
                               for b in br]
    # viz: feature visualizations (4 alive mixed3a latents), crops of every firing mixed3b
    # latent, upstream latents of mixed3b 0-3 from the circuits stage
    shown = [e["latent"] for e in json.loads((real_run / "viz" / "featurevis" / "mixed3a" /
                                              "index_latent.json").read_text())["latents"]]
    assert len(shown) == 4
    for j in shown:
        fv = _detail(out.parent, meta, "mixed3a", j)["fv"]
        assert fv and all((out.parent / src).is_file() for _, src in fv)
    for j in range(4):
        up = _detail(out.parent, meta, "mixed3b", j)["up"]
        assert up and all(u[0] == "mixed3a" and isinstance(u[1], int) for u in up)
    _, t3b = _call(out.parent / "assets" / "data" / "t1.js")
    _check_gallery(real_run, out, meta, "mixed3b", t3b)
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    # a rebuild replaces the assets; a foreign assets folder is never touched
    again = build_report(real_run)
    assert again == out and not list(out.parent.glob(".assets-*"))
    foreign = real_run / "elsewhere"
    (foreign / "assets").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by branchlens"):
        build_report(real_run, foreign)


def test_report_tolerates_missing_and_broken_artifacts(real_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        build_report(empty)  # a folder that is no run gets no report
    (empty / "store").mkdir()  # a run whose harvest has not written anything yet
    page = build_report(empty).read_text()
    for cmd in ("harvest", "train", "analyze"):
        assert f"not available: run <code>branchlens {cmd} " in page or \
            f"not available: run branchlens {cmd} " in page
    assert "RANDOM WEIGHTS" not in page

    # gallery.json / sprites.json naming files outside the run (a shared folder must not pull
    # them in), and a gallery edited so that it no longer fits its maps
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (224, 224), (1, 2, 3)).save(secret, format="JPEG")
    nosy = tmp_path / "nosy"
    shutil.copytree(real_run, nosy)
    shutil.rmtree(nosy / "report", ignore_errors=True)
    gj = nosy / "viz" / "examples" / "mixed3b" / "gallery.json"
    doc = json.loads(gj.read_text())
    for r, bad in zip(doc["image_files"], [str(secret), "../../../../secret.jpg",
                                           "/etc/passwd"], strict=False):
        r["file"] = bad
    (nosy / "viz" / "examples" / "mixed3b" / "images" / "link.jpg").symlink_to(secret)
    doc["image_files"][-1]["file"] = "images/link.jpg"
    gj.write_text(json.dumps(doc))
    out = build_report(nosy)
    copied = [p.read_bytes() for p in (out.parent / "assets").rglob("*.jpg")]
    assert secret.read_bytes() not in copied and copied
    assert "gallery example(s) left out: their image file is missing, outside the run" in \
        out.read_text()
    doc["grid"] = [2, 2]  # positions beyond the grid: refused, said, no crops
    gj.write_text(json.dumps(doc))
    page = build_report(nosy).read_text()
    assert "mixed3b: the examples gallery is unreadable (ValueError: a unit or value out of " \
        "range); re-run branchlens examples" in page
    legacy = tmp_path / "legacy"  # a run from before the gallery: sprite sheets only
    make_run(legacy, {"mixed4a": 40})
    add_sprites(legacy, tiles=3, px=24)
    sj = legacy / "viz" / "examples" / "mixed4a" / "sprites.json"
    doc = json.loads(sj.read_text())
    secret.write_bytes((sj.parent / doc["sheets"][0]).read_bytes() + b"x")
    doc["sheets"] = [str(secret)]
    sj.write_text(json.dumps(doc))
    out = build_report(legacy)
    assert secret.read_bytes() not in [p.read_bytes() for p in (out.parent / "assets").rglob(
        "*.jpg")]

    partial = tmp_path / "partial"  # store + SAEs only, one SAE folder broken
    shutil.copytree(real_run / "store", partial / "store")
    shutil.copytree(real_run / "sae", partial / "sae")
    (partial / "sae" / "mixed3a" / "metrics.png").unlink()  # falls back to inline sparklines
    (partial / "sae" / "broken").mkdir()
    (partial / "sae" / "broken" / "cfg.json").write_text("{not json")
    out = build_report(partial)
    page = out.read_text()
    assert "could not read cfg.json" in page and 'class="spark"' in page
    meta = _meta(out)  # the browser works from the SAEs alone (geometry, no statistics)
    assert [x["name"] for x in meta["layers"]] == LAYERS
    d = _detail(out.parent, meta, "mixed3b", 0)
    assert d["nb"] and d["band"] and d["pr"] == [None] * 4

    shutil.copytree(real_run / "analysis", partial / "analysis")
    shutil.copytree(real_run / "viz", partial / "viz")
    bad_png = next((partial / "viz" / "featurevis" / "mixed3a").glob("*.png"))
    bad_png.write_bytes(b"\x89PNG broken")
    (partial / "analysis" / "ratio_curves_mixed3a.png").unlink()
    (partial / "analysis" / "embedding_mixed3b.npy").write_bytes(b"garbage")
    summary = json.loads((partial / "analysis" / "summary.json").read_text())
    summary["per_layer"]["mixed3a"]["branches"][0]["branch"] = EVIL
    (partial / "analysis" / "summary.json").write_text(json.dumps(summary))
    out = build_report(partial)
    page = out.read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "examples not available: run <code>branchlens examples" in page  # mixed3a only
    meta = _meta(out)
    assert [x["embedding"] for x in meta["layers"]] == [True, False]
    fv = {}
    shown = [e["latent"] for e in json.loads((real_run / "viz" / "featurevis" / "mixed3a" /
                                              "index_latent.json").read_text())["latents"]]
    for j in shown:
        for cap, src in _detail(out.parent, meta, "mixed3a", j)["fv"]:
            fv[cap, j] = src
    assert sorted(v is None for v in fv.values()) == [False, False, False, True]


def _require_browser() -> None:
    from _browser import unavailable_reason

    why = unavailable_reason()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the browser test cannot run: {why}")
    pytest.skip(f"browser test skipped: {why}")


def test_browser_waits_work_under_the_report_csp(tmp_path: Path) -> None:
    """The report forbids eval (script-src 'self'); Playwright polls an expression *string*
    predicate with eval, so every wait is a function predicate. This page becomes ready only
    after a delay, so the predicate must be polled (a true-at-once check never reaches eval)."""
    _require_browser()
    from _browser import open_page

    (tmp_path / "p.js").write_text("setTimeout(() => { window.ready = 1; }, 400);")
    (tmp_path / "p.html").write_text(
        "<!doctype html><html><head><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; script-src 'self'\"><script src='p.js'></script>"
        "</head><body>x</body></html>")
    with open_page(tmp_path / "p.html") as (page, log):
        with pytest.raises(ValueError, match="function predicate"):
            wait_until(page, "window.ready === 1")  # would be an EvalError under the CSP
        wait_until(page, "() => window.ready === 1")
        assert page.evaluate("() => window.ready") == 1
        assert log.console_errors == []


def _rows_in_dom(page) -> list[list[str]]:
    return page.evaluate("Array.from(document.querySelectorAll('#tbody .trow'))"
                         ".sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top))"
                         ".map(r => Array.from(r.children).map(c => c.textContent))")


def _click_point(page, layer_index: int) -> tuple[str, int]:
    """Click the embedding point farthest from any other shown point; (layer, latent)."""
    page.select_option("#e-layer", str(layer_index))
    j, x, y = page.evaluate("""li => {
        const t = BL.tables[li]; let best = -1, bd = -1;
        const ids = []; for (let j = 0; j < t.x.length; j++) if (t.x[j] >= 0) ids.push(j);
        for (const j of ids.slice(0, 400)) {
          let m = Infinity;
          for (const k of ids) {
            if (k !== j) m = Math.min(m, (t.x[j] - t.x[k]) ** 2 + (t.y[j] - t.y[k]) ** 2);
          }
          if (m > bd) { bd = m; best = j; }
        }
        const s = (520 - 16) / 1000;
        return [best, 8 + t.x[best] * s, 8 + t.y[best] * s];
    }""", layer_index)
    page.query_selector("#scatter").scroll_into_view_if_needed()
    box = page.query_selector("#scatter").bounding_box()
    page.mouse.move(box["x"] + x, box["y"] + y)
    assert page.is_visible("#tip") and f"#{j} " in page.inner_text("#tip")
    page.mouse.click(box["x"] + x, box["y"] + y)
    wait_until(page, "j => document.getElementById('latent').dataset.latent === String(j)", arg=j)
    return page.inner_text("#latent h3"), j


def test_report_in_chromium(real_run: Path) -> None:
    _require_browser()
    from _browser import broken_images, open_crops, open_latent, open_page, shown_count, wait_ready

    out = build_report(real_run)
    meta = _meta(out)
    total = sum(x["n"] for x in meta["layers"])
    with open_page(out) as (page, log):
        wait_ready(page)
        assert page.inner_text("#f-count") == f"{total} of {total} latents"
        page.select_option("#f-layer", "1")
        n_layer = shown_count(page)
        assert n_layer == meta["layers"][1]["n"]
        assert {r[0] for r in _rows_in_dom(page)} == {"mixed3b"}
        page.select_option("#f-dom", "5x5")  # planted in mixed3b
        n5 = shown_count(page)
        assert 0 < n5 < n_layer and {r[2] for r in _rows_in_dom(page)} == {"5x5"}
        page.select_option("#f-dom", "")
        page.select_option("#f-layer", "")
        page.select_option("#f-cat", EVIL)  # a hostile category is an option, shown as text
        assert shown_count(page) == 1 and _rows_in_dom(page)[0][-2] == EVIL
        page.select_option("#f-cat", "")

        page.fill("#f-search", "mixed3b:2")
        assert shown_count(page) == 1 and _rows_in_dom(page)[0][:2] == ["mixed3b", "2"]
        page.fill("#f-search", "3")
        assert shown_count(page) == 2  # latent 3 of both layers
        page.fill("#f-search", "99999")
        assert shown_count(page) == 0 and page.is_visible("#f-empty")
        page.fill("#f-search", "")

        page.click("#thead button[data-key='rate']")  # numbers sort descending first
        rates = [float(r[-4]) if r[-4] != "—" else -1 for r in _rows_in_dom(page)]
        assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
        page.click("#thead button[data-key='rate']")
        rates = [float(r[-4]) if r[-4] != "—" else 9 for r in _rows_in_dom(page)]
        assert rates == sorted(rates)

        with page.expect_download() as dl:  # CSV of exactly what is shown
            page.select_option("#f-layer", "0")
            page.click("#dl-csv")
        lines = Path(dl.value.path()).read_text().splitlines()
        assert len(lines) == 1 + meta["layers"][0]["n"]
        assert {ln.split(",")[0] for ln in lines[1:]} == {"mixed3a"}
        page.select_option("#f-layer", "")

        # a latent with crops, a feature visualization and upstream links
        shown = json.loads((real_run / "viz" / "featurevis" / "mixed3a" / "index_latent.json")
                           .read_text())["latents"][1]["latent"]
        open_latent(page, "mixed3a", shown)
        assert page.query_selector_all("#latent .fvs img")
        open_latent(page, "mixed3b", 0)
        assert page.inner_text("#latent h3").startswith("mixed3b #0")
        assert page.query_selector_all("#latent .bar .band")
        page.click("#latent .links ol a")  # upstream latent in mixed3a
        wait_until(page, "() => document.getElementById('latent').dataset.layer === 'mixed3a'")
        page.click("#latent .nbs a")  # a decoder-space neighbour
        wait_until(page, "() => document.getElementById('latent').dataset.layer === 'mixed3a'")
        details = [_detail(out.parent, meta, "mixed3b", k) for k in range(meta["layers"][1]["n"])]
        with_strip = next(k for k, d in enumerate(details) if "strips" in d)
        _, _, crops = open_crops(page, "mixed3b", with_strip)  # the gallery, and the strips
        assert crops and page.query_selector_all("#latent img.strip")
        assert not page.query_selector_all("#latent .exs .tile")
        from branchlens.viz.receptive import receptive_field
        from branchlens.viz.sprites import load_gallery

        rf = receptive_field("bvlc_googlenet", "mixed3b")
        doc, gt = load_gallery(real_run / "viz" / "examples" / "mixed3b")
        ids = {r["index"]: r["id"] for r in doc["image_files"]}
        firing = [k for k in range(gt["images"].shape[0]) if gt["images"][k, 0] >= 0]
        for j in (firing[len(firing) // 2], firing[-1]):  # any latent that fires
            _, _, crops = open_crops(page, "mixed3b", j)
            slots = [s for s in range(12) if gt["images"][j, s] >= 0]
            assert len(crops) == len(slots) and not any(c["broken"] for c in crops)
            for s, c in zip(slots, crops, strict=True):
                y, x = int(gt["ys"][j, s]), int(gt["xs"][j, s])
                assert c["width"] == c["height"] == meta["crop_px"] >= 96
                assert c["unit"] == [y, x] and c["box"] == list(rf.box(y, x, 224))
                assert ids[int(gt["images"][j, s])] in c["title"]  # markup in ids: text
        assert any("<script>alert(1)<" in c["title"] for k in firing[:30]
                   for c in open_crops(page, "mixed3b", k)[2])
        label, j = _click_point(page, 1)
        assert label.startswith(f"mixed3b #{j}")
        assert broken_images(page) == []
        assert log.console_errors == [] and log.dialogs == [] and log.requests == []


HOSTILE_LAYER = "mixed4a<img src=x onerror=alert(3)>"


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    layers = {"mixed4a": 10240, "mixed4b": 10240, "mixed4c": 10240, "mixed4d": 10240}
    return make_run(tmp_path_factory.mktemp("big") / "run", layers, hostile_layer=HOSTILE_LAYER)


def test_report_40k_latents_in_chromium(big_run: Path) -> None:
    _require_browser()
    from _browser import open_latent, open_page, shown_count, wait_ready

    out = build_report(big_run)
    meta = _meta(out)
    assert [x["n"] for x in meta["layers"]] == [10240] * 4
    rows = _csv_rows(big_run)
    with open_page(out) as (page, log):
        wait_ready(page)
        assert page.inner_text("#f-count") == "40960 of 40960 latents"
        assert len(_rows_in_dom(page)) < 60  # virtualised
        page.eval_on_selector("#tbody", "e => { e.scrollTop = e.scrollHeight; }")
        wait_until(page, "() => Array.from(document.querySelectorAll('#tbody .trow'))"
                         ".some(r => parseFloat(r.style.top) === 40959 * 22)")
        last = _rows_in_dom(page)[-1]
        assert last[:2] == ["mixed4d", "10239"]
        assert HOSTILE_LAYER in page.evaluate(  # text, not markup
            "Array.from(document.querySelectorAll('#f-layer option')).map(o => o.textContent)")

        page.select_option("#f-sigraw", "yes")
        sig = sum(1 for r in rows.values() if any(
            r[f"q_raw_{b}"] and float(r[f"q_raw_{b}"]) <= 0.05 for b in ("1x1", "3x3", "5x5",
                                                                          "pool")))
        assert shown_count(page) == sig
        page.select_option("#f-sigraw", "")
        page.select_option("#f-rbranch", "5x5")
        page.fill("#f-rmin", "0.9")
        n9 = sum(1 for r in rows.values() if float(r["paper_ratio_5x5"]) >= 0.9)
        assert n9 > 0 and abs(shown_count(page) - n9) <= 3  # ratios are rounded to 0.001
        page.fill("#f-rmin", "0")
        page.click("#thead button[data-key='r:5x5']")
        top = _rows_in_dom(page)[0]
        best = max(rows.values(), key=lambda r: float(r["paper_ratio_5x5"]))
        assert float(top[8]) == pytest.approx(float(best["paper_ratio_5x5"]), abs=0.006)

        ms = [open_latent(page, name, j) for name, j in ((HOSTILE_LAYER, 5), ("mixed4d", 10239),
                                                         ("mixed4b", 4000))]
        assert all(m < 5000 for m in ms)  # loads (timing is the benchmark's business)
        assert page.inner_text("#latent h3").startswith("mixed4b #4000")
        label, j = _click_point(page, 2)
        assert label.startswith(f"mixed4c #{j}")
        assert log.console_errors == [] and log.dialogs == [] and log.requests == []


def test_a_truncated_latent_table_is_said_not_silently_shown(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", {"mixed4a": 300, "mixed4b": 200})
    table = run / "analysis" / "latents.csv"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:-120]) + lines[-120][:40] + "\n")  # cut, one broken line
    page = build_report(run, tmp_path / "out").read_text()
    assert "1 damaged line(s) left out" in page
    assert "latents.csv holds 80 of 200 latents of mixed4b" in page
    assert "of mixed4a" not in page  # the complete layer is not flagged


# -- the gallery of every latent, drawn in the page -------------------------------------------

RLO_NAME = "n01440764_\u202egpj.exe"  # shows as "n01440764_exe.jpg" unless isolated
ODD_DIR = "it's a \"run\" folder"


@pytest.fixture(scope="module")
def gallery_run(tmp_path_factory) -> tuple[Path, dict]:
    """A synthetic run (in a folder whose name needs shell quoting) whose mixed4a has a gallery
    of 12 smooth images per latent (one image named with a right-to-left override); mixed4b
    has no examples. Latent 7's analysis top images: that name first, then two plain ones."""
    run = make_run(tmp_path_factory.mktemp("gal") / ODD_DIR / "run",
                   {"mixed4a": 300, "mixed4b": 130})
    gals = add_gallery(run, ["mixed4a"], n_images=16, ids={3: RLO_NAME})
    path = run / "analysis" / "latents.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[7]["top_images"] = f"{RLO_NAME};n01440764_bbb.JPEG;n01440764_ccc.JPEG"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return run, gals


def _reference_crop(img01: torch.Tensor, rf, y: int, x: int, heat01: torch.Tensor | None,
                    px: int) -> np.ndarray:
    """The picture the page should draw, computed independently here: the image with the map
    overlaid (heatmap: unit (y, x) at its receptive-field centre), cut to the receptive-field
    box inside the image, fitted into px x px, grey around it."""
    import math

    import torch.nn.functional as F

    from branchlens.viz.examples import OVERLAY_ALPHA, OVERLAY_RED, heatmap

    comp = img01
    if heat01 is not None:
        a = heatmap(heat01, rf, img01.shape[-1]).clamp(0, 1) * OVERLAY_ALPHA
        comp = img01 * (1 - a) + torch.tensor(OVERLAY_RED).view(3, 1, 1) * a
    t, l_, b, r = rf.box(y, x, img01.shape[-1])
    s = px / max(r - l_, b - t)
    dw, dh = math.floor((r - l_) * s + 0.5), math.floor((b - t) * s + 0.5)
    small = F.interpolate(comp[None, :, t:b, l_:r], size=(dh, dw), mode="bilinear",
                          antialias=True, align_corners=False)[0]
    out = torch.full((3, px, px), 128 / 255)
    oy, ox = (px - dh) // 2, (px - dw) // 2
    out[:, oy:oy + dh, ox:ox + dw] = small
    return (out.clamp(0, 1) * 255).permute(1, 2, 0).numpy()


def test_gallery_crops_are_the_receptive_field_with_the_map_in_chromium(gallery_run) -> None:
    """For an arbitrary latent the page draws 12 crops of >= 96 px; each is the receptive-field
    box of the recorded unit, its red overlay peaks at that unit, its pixels are the image with
    the map overlaid (computed independently above), and its caption is the image's class."""
    _require_browser()
    from _browser import PIXELS, canvas_pixels, open_crops, open_page, wait_ready
    from branchlens.variants import class_names
    from branchlens.viz.receptive import receptive_field
    from branchlens.viz.sprites import entry_map, load_gallery

    run, gals = gallery_run
    out = build_report(run)
    meta = _meta(out)
    _, t = _call(out.parent / "assets" / "data" / "t0.js")
    _check_gallery(run, out, meta, "mixed4a", t)
    rf = receptive_field("bvlc_googlenet", "mixed4a")
    doc, gt = load_gallery(run / "viz" / "examples" / "mixed4a")
    names = class_names("bvlc_googlenet")
    px = meta["crop_px"]
    with open_page(out, args=PIXELS) as (page, log):
        wait_ready(page)
        for j in (123, 299):
            _, ms, crops = open_crops(page, "mixed4a", j)
            assert len(crops) == 12 and ms < 5000
            vmax = float(gt["values"][j].max())
            for s, c in enumerate(crops):
                i, y, x = (int(gt[k][j, s]) for k in ("images", "ys", "xs"))
                assert c["width"] == c["height"] == px >= 96 and not c["broken"]
                assert c["unit"] == [y, x] and c["box"] == list(rf.box(y, x, 224))
                assert c["cls"] == names[i % 1000]  # add_gallery labels image i as class i % 1000
                assert f"{float(gt['values'][j, s]):.3g}" in c["caption"]
                img = torch.from_numpy(np.array(Image.open(
                    run / "viz" / "examples" / "mixed4a" / f"images/{i:06d}.jpg"))).permute(
                    2, 0, 1).float() / 255
                heat = entry_map(gt, doc["grid"], j, s) / vmax
                got = canvas_pixels(page, s).astype(float)
                want = _reference_crop(img, rf, y, x, heat, px)
                plain = _reference_crop(img, rf, y, x, None, px)
                assert np.abs(got - want).mean() < 4 and np.percentile(np.abs(got - want),
                                                                       99) < 25
                if gt["values"][j, s] < 0.5 * vmax:
                    continue  # a faint overlay: the pixels above say enough
                assert np.abs(got - plain).mean() > 2 * np.abs(got - want).mean()
                # the overlay's opacity (got = plain * (1 - a) + red * a, least squares over
                # the channels) peaks at the unit's centre, within a third of a unit
                red = np.array([255, 25.5, 25.5]) - plain
                alpha = ((got - plain) * red).sum(-1) / np.maximum((red ** 2).sum(-1), 1e3)
                py, pxx = np.unravel_index(np.argmax(alpha), alpha.shape)
                t_, l_, b_, r_ = c["box"]
                sc = px / max(r_ - l_, b_ - t_)
                cy, cx = rf.center(y, x)
                oy = (px - round((b_ - t_) * sc)) // 2
                ox = (px - round((r_ - l_) * sc)) // 2
                assert abs(py + 0.5 - (oy + (cy - t_ + 0.5) * sc)) <= rf.stride * sc / 3
                assert abs(pxx + 0.5 - (ox + (cx - l_ + 0.5) * sc)) <= rf.stride * sc / 3
        assert log.console_errors == [] and log.dialogs == [] and log.requests == []


def test_names_are_isolated_and_commands_shell_quoted_in_chromium(gallery_run) -> None:
    """A right-to-left override in one file name neither reverses the names after it (each
    name is its own <bdi>, the control shown as a marker) nor hides what the name holds; every
    command the report suggests, pasted into a shell, names this very run folder."""
    import shlex

    _require_browser()
    from _browser import open_latent, open_page, wait_ready

    run, _ = gallery_run
    out = build_report(run)
    (out.parent / "assets" / "data" / "g0_0.js").unlink()  # a gallery chunk gone: said, no hang
    page_html = out.read_text()
    cmds = [html.unescape(c) for c in re.findall(r"<code>(branchlens [^<]*)</code>", page_html)]
    assert any(" examples " in c and c.endswith("--layer mixed4b") for c in cmds)
    assert cmds and all(shlex.split(c)[2] == str(run) for c in cmds)
    where = """p => ['bbb', 'ccc'].map(w => {  // screen x of each name on one line
        p.style.whiteSpace = 'nowrap';
        const t = document.createTreeWalker(p, NodeFilter.SHOW_TEXT);
        for (let n = t.nextNode(); n; n = t.nextNode()) {
          const i = n.data.indexOf(w);
          if (i >= 0) { const r = document.createRange(); r.setStart(n, i);
                        r.setEnd(n, i + 3); return r.getBoundingClientRect().left; }
        } })"""
    with open_page(out) as (page, log):
        wait_ready(page)
        open_latent(page, "mixed4a", 7)
        p = page.query_selector("#latent .ids")
        assert "n01440764_⟨U+202E⟩gpj.exe" in p.inner_text() and "\u202e" not in p.inner_text()
        assert len(p.query_selector_all("bdi")) == 3
        wait_until(page, "() => document.querySelector('#latent .gallery').textContent"
                         ".startsWith('could not load')")
        bbb, ccc = p.evaluate(where)
        assert bbb < ccc  # left to right, in the order the analysis lists them
        # the same names as one plain text (the page before the fix): the override reverses
        # them, so the check above can fail
        plain = page.evaluate_handle("""n => { const p = document.createElement('p');
            p.textContent = n.join(', '); document.getElementById('latent').appendChild(p);
            return p; }""", [RLO_NAME, "n01440764_bbb.JPEG", "n01440764_ccc.JPEG"])
        bbb, ccc = plain.evaluate(where)
        assert bbb > ccc
        shown = []
        for layer, j in (("mixed4a", 8), ("mixed4b", 3)):
            open_latent(page, layer, j)
            shown += page.eval_on_selector_all("#latent code.cmd", "e => e.map(c => c.textContent)")
        words = [shlex.split(c) for c in shown]
        assert {w[1] for w in words} == {"visualize", "examples", "circuits"}
        assert all(w[2] == str(run) for w in words)
        assert log.requests == [] and all("g0_0.js" in e or "ERR_FILE_NOT_FOUND" in e
                                          for e in log.console_errors)


def test_a_run_with_old_sprite_sheets_still_shows_its_crops_in_chromium(tmp_path: Path) -> None:
    _require_browser()
    from _browser import broken_images, open_latent, open_page, wait_ready

    run = make_run(tmp_path / "run", {"mixed4a": 40})
    add_sprites(run, tiles=3, px=24)
    out = build_report(run)
    with open_page(out) as (page, log):
        wait_ready(page)
        open_latent(page, "mixed4a", 5)
        assert len(page.query_selector_all("#latent .exs .tile")) == 3
        assert not page.query_selector_all("#latent .gallery")
        src = _detail(out.parent, _meta(out), "mixed4a", 5)["ex"]["src"]
        assert page.evaluate("s => new Promise(r => { const i = new Image(); i.onload = () => "
                             "r(i.naturalWidth); i.onerror = () => r(0); i.src = s; })", src) > 0
        assert broken_images(page) == [] and log.console_errors == []


def test_a_killed_report_build_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    """kill -9 in the middle of a build leaves its temp folders; the next build removes them
    (and only them). A build that is still alive holds the folder: a second one refuses."""
    import fcntl
    import signal
    import subprocess
    import sys

    run = make_run(tmp_path / "run", {"mixed4a": 64})
    (run / "report").mkdir()
    (run / "report" / "NOTES.txt").write_text("mine")
    kill = ("import os, signal, sys\nfrom branchlens.report import build_report\n"
            "build_report(sys.argv[1], log=lambda s: os.kill(os.getpid(), signal.SIGKILL))\n")
    r = subprocess.run([sys.executable, "-c", kill, str(run)], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-500:]
    left = sorted(p.name for p in (run / "report").iterdir())
    assert [n for n in left if n.startswith(".assets-new-")] and "assets" not in left
    (run / "report" / ".index.html.a1b2c3d4.tmp").write_text("half a page")  # killed later
    build_report(run)
    assert sorted(p.name for p in (run / "report").iterdir()) == ["NOTES.txt", "assets",
                                                                 "index.html"]
    fd = os.open(run / "report", os.O_RDONLY)  # a build in progress (another process's lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another branchlens report is being written"):
            build_report(run)
    finally:
        os.close(fd)
    assert (run / "report" / "index.html").is_file()


def test_examples_stage_cleans_what_a_killed_run_left(real_run: Path) -> None:
    ex = real_run / "viz" / "examples" / "mixed3b"
    assert not (ex / "tmpa1b2c3").exists() and not list(ex.glob(".*.tmp"))
    assert (ex / "gallery.json").is_file() and (ex / "top.safetensors").is_file()


def test_latent_pages_say_what_the_latent_promotes_and_suppresses_in_chromium(tmp_path: Path
                                                                            ) -> None:
    """The effects stage's per-latent table reaches the latent page; a latent it did not
    ablate says so with the command that would, and a layer without effects shows nothing."""
    _require_browser()
    from _browser import open_latent, open_page, wait_ready
    from branchlens.run import Run
    from branchlens.stages.effects import write_effects_table

    run = make_run(tmp_path / "run", {"mixed4a": 40, "mixed4b": 40})
    Run(run).effects_dir.mkdir()
    write_effects_table(Run(run).effects_table_path("mixed4a"), [
        {"latent": 3, "n_images": 4, "promotes": "tabby (+0.120); lion (+0.010)",
         "suppresses": "\u202egnome (+0.050)", "max_abs_delta_prob": 0.12}])
    out = build_report(run)
    with open_page(out) as (page, log):
        wait_ready(page)
        open_latent(page, "mixed4a", 3)
        text = page.inner_text("#latent")
        assert "promotes: tabby (+0.120); lion (+0.010)" in text
        assert "suppresses: ⟨U+202E⟩gnome (+0.050)" in text
        open_latent(page, "mixed4a", 4)
        text = page.inner_text("#latent")
        assert "promotes:" not in text and "not ablated by the effects stage" in text
        assert "--scope all" in text
        open_latent(page, "mixed4b", 3)
        text = page.inner_text("#latent")
        assert "promotes:" not in text and "effects stage" not in text
        assert log.console_errors == []
