"""``branchlens.Run``: the notebook API reads every artifact of a finished run, and its numbers
agree with what the SAE, the store and the network compute directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import branchlens
from branchlens.data import decode_image
from branchlens.run import ProvenanceError, RunError

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")


@pytest.fixture(scope="module")
def run(e2e_run):
    return branchlens.Run(e2e_run[0])


def test_layout_and_readers(run):
    assert run.layers == ["mixed4a", "mixed4b"]
    assert run.record()["stages"]["report"]["status"] == "done"
    assert run.report_index.is_file() and run.summary()["layers"] == run.layers
    assert [c["verdict"] for c in run.claims()]  # five claims, each with a verdict
    table = run.latents("mixed4b")
    assert len(table) == 512 and table.branches == ["1x1", "3x3", "5x5", "pool"]
    assert table.column("latent").tolist() == list(range(512))
    assert all(isinstance(r["top_images"], list) for r in table)
    alive = table.where(alive=True)
    assert 0 < len(alive) <= 512 and all(r["alive"] for r in alive)


def test_latent_ratios_are_the_decoder_directions(run):
    sae = run.sae("mixed4a")
    dirs = sae.decoder_directions().detach()
    slices = {b: slice(*s) for b, s in sae.cfg.branch_slices.items()}
    for i in (0, 7, 300):
        lat = run.latent("mixed4a", i)
        v = dirs[i].clamp_min(0)
        for b, s in slices.items():
            want = float(v[s].norm() / v.norm()) if v.norm() > 0 else math.nan
            assert lat.ratios[b] == pytest.approx(want, rel=1e-4, abs=1e-6), (i, b)
        assert set(lat.p_values) == set(slices) and set(lat.q_values["5x5"]) == {"raw", "scale"}
        assert lat.dominant in (None, *slices)
        assert torch.allclose(lat.direction, dirs[i])


def test_encode_images_matches_the_stored_vectors(run):
    store = run.store()
    src, _ = run.source()
    prov = np.asarray(store.provenance("mixed4a"))
    rows = np.flatnonzero(prov[:, 0] == 2)[:5]  # positions of image 2
    stored = torch.from_numpy(np.asarray(store.array("mixed4a")[rows], np.float32))
    codes = run.encode_images([decode_image(src[2].payload)], "mixed4a")
    sae = run.sae("mixed4a")
    assert codes.shape == (1, sae.cfg.n_latents, 14, 14)
    with torch.no_grad():
        want = sae.encode(stored)
    got = torch.stack([codes[0, :, y, x] for _, y, x, *_ in prov[rows]])
    assert torch.allclose(got, want, atol=2e-2 * float(want.abs().max()) + 1e-4)


def test_top_images_and_visualize(run):
    best = max(run.latents("mixed4a"), key=lambda r: len(r["top_images"]))
    lat = run.latent("mixed4a", best["latent"])
    assert lat.top_image_ids == best["top_images"] and lat.top_image_ids  # held-out images
    crops = lat.top_images(3, tile=64)
    assert len(crops) == min(3, len(lat.top_image_ids))
    assert all(c.size == (64, 64) for c in crops)
    rendered = sorted(run.featurevis_dir("mixed4a").glob("mixed4a_*_latent.png"))
    assert rendered, "the visualize stage rendered latents"
    j = int(rendered[0].name.split("_")[1])
    cached = run.latent("mixed4a", j).visualize()
    assert np.array_equal(np.asarray(cached), np.asarray(Image.open(rendered[0]).convert("RGB")))
    fresh = run.latent("mixed4a", lat.index).visualize(steps=2, size=64)
    assert fresh.size == (64, 64)


def test_clear_errors(run, tmp_path):
    with pytest.raises(RunError, match="branchlens train"):
        run.sae("mixed4e")
    with pytest.raises(IndexError, match="0..511"):
        run.latent("mixed4a", 512)
    empty = branchlens.Run(tmp_path)
    with pytest.raises(RunError, match="branchlens analyze"):
        empty.latents("mixed4a")
    with pytest.raises(RunError, match="branchlens harvest"):
        empty.store()
    with pytest.raises(ProvenanceError, match="RANDOM"):
        branchlens.Run(run.path, weights="/nonexistent.safetensors").model()


def test_a_run_folder_never_runs_its_sources_shell_command(run, tmp_path, monkeypatch):
    """A store harvested from ``wds:pipe:...`` (or a manifest edited to say so) is not reopened
    by itself: webdataset would run the command through the shell for whoever opens the run."""
    import json
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run.path / "store", copy / "store")
    manifest = copy / "store" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["source"]["description"] = f"wds:pipe:touch {tmp_path / 'PWNED'} && cat s.tar"
    manifest.write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProvenanceError, match="runs a shell command"):
        branchlens.Run(copy).source()
    assert not (tmp_path / "PWNED").exists()
