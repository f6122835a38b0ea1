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
from _report_run import make_run
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
        examples_stage(run, "mixed3b", n_top=4, latents=[0, 1, 2, 3], batch_size=8,
                       weights="random", device="cpu", show_progress=False, heldout=False,
                       sprite_tiles=3, sprite_px=24)
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
    # the examples strip of an evidence latent that has one (the fixture drew strips of 0-3)
    strips = [m for t in tiles for m in re.findall(r'<img class="strip" loading="lazy" '
                                                    r'src="([^"]+)"', t)]
    with_strip = {j for js in ev["cells"].values() for j in js} & {0, 1, 2, 3}
    assert len(set(strips)) == len(with_strip)
    assert all(Image.open(out.parent / html.unescape(i)).height == 128 for i in strips)
    # each strip's images by name, best first, as the examples index lists them
    ex = json.loads((real_run / "viz" / "examples" / "mixed3b" / "index.json").read_text())
    from branchlens.report.evidence import short_name

    for e in ex["latents"]:
        if e["latent"] in with_strip:
            names = " · ".join(short_name(x["image_id"]) for x in e["examples"][:6])
            assert html.escape(f"top: {names}", quote=True) in claims
    assert short_name("imagenet-sample/n01440764_tench.JPEG#flip") == "tench"


def _call(path: Path) -> list:
    """The arguments of a data script ``BL.name(a, b, ...);`` (JSON)."""
    text = path.read_text(encoding="ascii")
    m = re.fullmatch(r"BL\.(table|detail)\((.*)\);\n", text, re.S)
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
    idx = json.loads((real_run / "viz" / "examples" / "mixed3b" / "sprites.json").read_text())
    _, t3b = _call(out.parent / "assets" / "data" / "t1.js")
    from safetensors.numpy import load_file

    values = load_file(str(real_run / "viz" / "examples" / "mixed3b" / "top.safetensors"))[
        "values"]
    firing = [j for j in range(values.shape[0]) if values[j, 0] > 0]
    assert len(firing) == idx["with_examples"] > 0
    assert all(t3b["ex"][j] for j in firing) and sum(t3b["ex"]) <= len(firing) + 4
    j = firing[0]
    ex = _detail(out.parent, meta, "mixed3b", j)["ex"]
    assert (out.parent / ex["src"]).is_file() and ex["tile"] == 24 and 1 <= ex["k"] <= 3
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

    # sprites.json naming files outside the run (a shared folder must not pull them in)
    nosy = tmp_path / "nosy"
    shutil.copytree(real_run, nosy)
    secret = tmp_path / "secret.jpg"
    sheet0 = json.loads((nosy / "viz" / "examples" / "mixed3b" / "sprites.json").read_text())[
        "sheets"][0]
    secret.write_bytes((nosy / "viz" / "examples" / "mixed3b" / sheet0).read_bytes() + b"x")
    sj = nosy / "viz" / "examples" / "mixed3b" / "sprites.json"
    doc = json.loads(sj.read_text())
    doc["sheets"] = [str(secret), "../../../../secret.jpg", "/etc/passwd"][:len(doc["sheets"])]
    sj.write_text(json.dumps(doc))
    shutil.rmtree(nosy / "report", ignore_errors=True)
    out = build_report(nosy)
    copied = [p.read_bytes() for p in (out.parent / "assets").rglob("*.jpg")]
    assert secret.read_bytes() not in copied

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
    from _browser import broken_images, open_latent, open_page, shown_count, wait_ready

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
        open_latent(page, "mixed3b", with_strip)  # full-size strips win over the sprites
        assert page.query_selector_all("#latent img.strip")
        assert not page.query_selector_all("#latent .exs .tile")
        j = next(k for k, d in enumerate(details) if "ex" in d and "strips" not in d)
        open_latent(page, "mixed3b", j)
        tiles = page.query_selector_all("#latent .exs .tile")
        assert tiles and page.evaluate(  # the sprite sheet decodes
            "s => new Promise(r => { const i = new Image(); i.onload = () => r(i.naturalWidth);"
            " i.onerror = () => r(0); i.src = s; })",
            _detail(out.parent, meta, "mixed3b", j)["ex"]["src"]) > 0
        hostile = [k for k, d in enumerate(details) if "strips" not in d
                   and any("<script>" in i for i in (d.get("ex") or {}).get("ids", []))]
        if hostile:  # an image named like markup is shown as text
            open_latent(page, "mixed3b", hostile[0])
            assert "<script>alert(1)<" in page.inner_text("#latent .exs + .ids")
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
