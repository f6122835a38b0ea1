"""``analyze(run_dir)`` end to end on a planted two-layer run with a CONTRACTS-shaped store."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from branchlens.analysis import NONE, AnalysisConfig, analyze, format_table
from branchlens.analysis.categories import is_animal
from branchlens.analysis.synthetic import planted_decoder
from branchlens.variants import branch_slices

LAYERS = ("mixed4a", "mixed4b")  # both 512 channels on a 14×14 grid
N_LAT, K, N_IMG, POS = 192, 6, 120, 16


class FakeStore:
    """Minimal in-memory store with the CONTRACTS API (array, provenance, images, stats)."""

    def __init__(self, arrays: dict, prov: np.ndarray, labels: list[int]):
        self.arrays, self.prov = arrays, prov
        self.layers = list(arrays)
        self.images = [{"id": f"img{i}", "label": int(lab)} for i, lab in enumerate(labels)]
        self.manifest = {"variant": "bvlc_googlenet", "layers": self.layers}

    def array(self, layer):
        return self.arrays[layer]

    def provenance(self, layer):
        return self.prov

    def count(self, layer):
        return len(self.arrays[layer])

    def dim(self, layer):
        return self.arrays[layer].shape[1]

    def layer_stats(self, layer):
        x = self.arrays[layer]
        return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from branchlens.sae import SAEConfig, TopKSAE

    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    sls = {layer: branch_slices("bvlc_googlenet", layer) for layer in LAYERS}
    labels = rng.integers(0, 1000, N_IMG)
    animal_img = np.array([is_animal(int(c)) for c in labels])
    # Rows: POS distinct positions per image, identical for both layers (aligned harvest).
    prov = np.array([(i, p // 14, p % 14, j) for i in range(N_IMG)
                     for j, p in enumerate(rng.choice(196, POS, replace=False))], np.int64)
    codes = np.zeros((len(prov), N_LAT))
    plants = {}
    for li, layer in enumerate(LAYERS):
        plants[layer] = planted_decoder(sls[layer], N_LAT // 2, N_LAT // 2, heavy=True, boost=8.0,
                                        seed=10 + li)
    truth_a = plants["mixed4a"].truth
    five = np.flatnonzero(truth_a == 2)
    for r, (img, *_rest) in enumerate(prov):
        # Animal images prefer the 5x5-planted latents ("5x5 ⇒ animals").
        w = np.ones(N_LAT)
        if animal_img[img]:
            w[five] = 12.0
        on = rng.choice(N_LAT, K, replace=False, p=w / w.sum())
        codes[r, on] = rng.uniform(1.0, 3.0, K)
    # Layer B latent perm[i] is layer A latent i, with the same planted branch.
    perm = rng.permutation(N_LAT)
    pb = plants["mixed4b"]
    order_b = np.empty(N_LAT, np.int64)
    for b in (NONE, 0, 1, 2, 3):  # give B's latent perm[i] a direction planted like A's i
        src = np.flatnonzero(pb.truth == b)
        dst = perm[np.flatnonzero(truth_a == b)]
        order_b[dst] = src[:dst.size]
    dec = {"mixed4a": plants["mixed4a"].decoder, "mixed4b": pb.decoder[order_b]}
    codes_b = np.zeros_like(codes)
    codes_b[:, perm] = codes
    arrays = {"mixed4a": (codes @ dec["mixed4a"]).astype(np.float32),
              "mixed4b": (codes_b @ dec["mixed4b"]).astype(np.float32)}
    for layer in LAYERS:
        cfg = SAEConfig(d_in=512, n_latents=N_LAT, k=K, decoder="untied", layer=layer,
                        variant="bvlc_googlenet",
                        branch_slices={b: [s.start, s.stop] for b, s in sls[layer].items()})
        sae = TopKSAE(cfg)
        with torch.no_grad():
            w = torch.from_numpy(dec[layer]).float()
            sae.W_enc.copy_(w)
            sae.W_dec.copy_(w)
        sae.save(root / "sae" / layer)
    store = FakeStore(arrays, prov, labels.tolist())
    config = AnalysisConfig(n_perm=500, refine_to=2000, top=32, min_images=10,
                            match_threshold=0.5, embed="pca", null_band_reps=5)
    summary = analyze(root, store=store, config=config)
    truth = {"mixed4a": truth_a, "mixed4b": pb.truth[order_b]}
    return root, summary, truth, perm


def test_outputs_written(run):
    root, summary, truth, _ = run
    out = root / "analysis"
    for name in ("summary.json", "latents.csv", "layers.csv"):
        assert (out / name).is_file()
    for layer in LAYERS:
        for ext in ("png", "svg"):
            assert (out / f"ratio_curves_{layer}.{ext}").is_file()
            assert (out / f"embedding_{layer}.{ext}").is_file()
        assert np.load(out / f"embedding_{layer}.npy").shape == (N_LAT, 2)
    assert json.loads((out / "summary.json").read_text())["layers"] == list(LAYERS)
    rows = list(csv.DictReader(open(out / "latents.csv")))
    assert len(rows) == 2 * N_LAT
    assert {"paper_ratio_5x5", "p_perm_5x5", "q_perm_5x5", "attribution_5x5", "top_category",
            "firing_rate", "alive", "dominant", "p_isotropic_1x1"} <= set(rows[0])
    layers_rows = list(csv.DictReader(open(out / "layers.csv")))
    assert len(layers_rows) == 2 * 4
    assert "p-values" in summary["pvalue_note"]
    text = format_table(summary)
    assert "mixed4a" in text and "mixed4a↔mixed4b" in text


def test_detection_and_attribution_on_planted_layers(run):
    root, summary, truth, _ = run
    rows = list(csv.DictReader(open(root / "analysis" / "latents.csv")))
    names = ["1x1", "3x3", "5x5", "pool"]
    for layer in LAYERS:
        lr = [r for r in rows if r["layer"] == layer]
        dom = np.array([names.index(r["dominant"]) if r["dominant"] != "none" else NONE
                        for r in lr])
        t = truth[layer]
        assert np.mean(dom[t != NONE] == t[t != NONE]) > 0.9
        assert np.mean(dom[t == NONE] != NONE) < 0.1
        # Data-side attribution: tied encoder = decoder, so the planted branch contributes
        # most of the top activations' pre-activation.
        att = np.array([[float(r[f"attribution_{b}"]) for b in names] for r in lr])
        planted = t != NONE
        own = att[planted, t[planted]]
        assert np.median(own) > 0.5
        s = summary["per_layer"][layer]
        assert s["alive_in_store"] == N_LAT and s["permuted_channels_control"]["significant"] <= 3
        assert s["knn_branch_agreement"]["n_labelled"] > 0


def test_cross_layer_and_category_results(run):
    _, summary, _, _ = run
    cl = summary["cross_layer"][0]
    assert cl["layers"] == list(LAYERS) and cl["aligned_samples"] == N_IMG * POS
    c = cl["consistency"]
    assert c["matched_pairs"] > 0.8 * N_LAT
    assert c["agreement"] > 0.8 and c["p_value"] < 0.01 and c["kappa"] > 0.6
    cat = summary["per_layer"]["mixed4a"]["category_test"]["5x5"]
    assert cat["effect"] > 0.3 and cat["p_value"] < 0.01
