"""The HTML report on a small but complete run made by the real stages, in real Chromium.

The run fixture calls the stages' own entry points (harvest -> store/, train_layers -> sae/,
analyze -> analysis/, visualize_stage / examples_stage / circuits_stage -> viz/) on 7 tiny
images with random weights, so the report reads exactly the formats a real run writes. Image
file names and one category label carry HTML/JS payloads.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from branchlens.report import build_report
from branchlens.report.builder import gather

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
        visualize_stage(run, "mixed3a", [0, 1, 2, 3], size=48, steps=2, weights="random",
                        device="cpu", show_progress=False)
        examples_stage(run, "mixed3b", n_top=4, latents=[0, 1, 2, 3], batch_size=8,
                       weights="random", device="cpu", show_progress=False)
        circuits_stage(run, "mixed3a", "mixed3b", latents=[0, 1, 2, 3], n_images=2,
                       flow_latents=4, n_perm=50, top_k=5, ablate=2, weights="random",
                       device="cpu", batch_size=8, show_progress=False)
    return run


def test_report_from_real_run(real_run: Path) -> None:
    out = build_report(real_run)
    assert out == real_run / "report" / "index.html"
    page = out.read_text()
    # self-contained: no external resources, one script (ours), CSP forbids the network
    for bad in ('src="http', "src='http", 'href="http', "<link", "url(http", "@import"):
        assert bad not in page
    assert page.count("<script") == 1 and "default-src 'none'" in page
    # every stage's artifacts made it in
    assert "RANDOM WEIGHTS" in page
    assert "folder:" in page and "not_image" in page
    for layer in LAYERS:
        assert f'data-layer="{layer}"' in page
    assert "mixed3a ↔ mixed3b" in page and 'class="cont"' in page
    assert page.count("data:image/svg+xml;base64,") >= 4  # ratio curves + embeddings
    assert page.count('class="fv"') == 4 and page.count('class="ex"') == 4
    assert "top upstream latents" in page and 'href="#card-mixed3a-' in page
    assert 'class="flow"' in page and "drop / attr." in page  # circuits section
    assert "not available" not in page.split('id="gallery"')[0]
    assert "Stages (run.json)" in page and "ValueError: &lt;script&gt;" in page
    # hostile names are text, never markup
    assert EVIL not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    ctx = gather(real_run)
    assert ctx.random_weights and ctx.variant == "bvlc_googlenet" and not ctx.notes
    assert {k for k in ctx.viz if ctx.viz[k].upstream} == {("mixed3b", i) for i in range(4)}
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_report_tolerates_missing_and_broken_artifacts(real_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    page = build_report(empty).read_text()
    for cmd in ("harvest", "train", "analyze"):
        assert f"not available: run <code>branchlens {cmd} " in page
    assert "RANDOM WEIGHTS" not in page

    partial = tmp_path / "partial"  # store + SAEs only, one SAE folder broken
    shutil.copytree(real_run / "store", partial / "store")
    shutil.copytree(real_run / "sae", partial / "sae")
    (partial / "sae" / "mixed3a" / "metrics.png").unlink()  # falls back to inline sparklines
    (partial / "sae" / "broken").mkdir()
    (partial / "sae" / "broken" / "cfg.json").write_text("{not json")
    page = build_report(partial).read_text()
    assert "could not read cfg.json" in page
    assert 'class="spark"' in page and "run <code>branchlens analyze " in page
    assert "FVU (held-out images)" in page

    shutil.copytree(real_run / "analysis", partial / "analysis")
    page = build_report(partial).read_text()
    for cmd in ("visualize", "examples", "circuits"):
        assert f"not available: run <code>branchlens {cmd} " in page
    assert 'class="card"' in page  # the gallery works from the analysis alone

    shutil.copytree(real_run / "viz", partial / "viz")
    bad_png = next((partial / "viz" / "featurevis" / "mixed3a").glob("*.png"))
    bad_png.write_bytes(b"\x89PNG broken")
    (partial / "analysis" / "ratio_curves_mixed3a.svg").unlink()
    summary = json.loads((partial / "analysis" / "summary.json").read_text())
    summary["per_layer"]["mixed3a"]["branches"][0]["branch"] = EVIL
    (partial / "analysis" / "summary.json").write_text(json.dumps(summary))
    page = build_report(partial).read_text()
    assert f"unreadable: {bad_png.name}" in page
    assert EVIL not in page
    assert page.count("<img ") == page.count('src="data:image/')


def _require_browser() -> None:
    from branchlens.report.browser import unavailable_reason

    why = unavailable_reason()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the browser test cannot run: {why}")
    pytest.skip(f"browser test skipped: {why}")


def test_report_in_chromium(real_run: Path) -> None:
    _require_browser()
    from branchlens.report.browser import broken_images, open_page, screenshot, visible_cards

    out = build_report(real_run)
    with open_page(out) as (page, log):
        assert page.evaluate("document.images.length") >= 14  # figures + fv + strips
        assert broken_images(page) == []
        total = visible_cards(page)
        assert total >= 8
        assert page.inner_text("#f-count") == f"{total} of {total} cards"

        page.select_option("#f-layer", "mixed3b")
        n_layer = visible_cards(page)
        assert 0 < n_layer < total
        page.select_option("#f-branch", "5x5")  # planted in mixed3b
        assert 0 < visible_cards(page) < n_layer
        page.select_option("#f-branch", "")
        page.select_option("#f-layer", "")
        page.select_option("#f-cat", EVIL)
        assert visible_cards(page) == 1
        page.select_option("#f-cat", "")

        page.fill("#f-search", "mixed3b:2")
        assert visible_cards(page) == 1
        assert page.is_visible("#card-mixed3b-2")
        page.fill("#f-search", "3")
        assert visible_cards(page) == 2  # latent 3 of both layers
        page.fill("#f-search", "99999")
        assert visible_cards(page) == 0 and page.is_visible("#f-empty")
        page.fill("#f-search", "")
        assert visible_cards(page) == total

        page.select_option("#f-sort", "rate")
        rates = page.evaluate("Array.from(document.querySelectorAll('#cards .card'))"
                              ".map(c => parseFloat(c.dataset.rate))")
        assert rates == sorted(rates, reverse=True)

        page.select_option("#f-layer", "mixed3b")  # an upstream link clears the filters
        page.click("#card-mixed3b-0 .ups a")
        assert visible_cards(page) == total
        assert log.console_errors == [] and log.dialogs == [] and log.requests == []

    shot = os.environ.get("BRANCHLENS_SCREENSHOT")
    if shot:
        assert screenshot(out, shot).stat().st_size > 10_000
