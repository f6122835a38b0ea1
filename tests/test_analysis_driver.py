"""``analyze(run_dir)`` end to end on a planted two-layer run with a CONTRACTS-shaped store."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from _synthetic import planted_decoder
from branchlens.analysis import NONE, AnalysisConfig, analyze, format_table
from branchlens.analysis.categories import is_animal
from branchlens.analysis.driver import AnalysisError
from branchlens.analysis.table import read_latent_table
from branchlens.store import ActivationStore
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

    def content_hash(self):
        return "fake-store"

    split_images = ActivationStore.split_images  # the real split, by underlying image


TRAINED = {"store_hash": "fake-store", "eval": {"heldout": {"fvu": 0.1}},
           "train": {"step": 10, "total_steps": 10,
                     "config": {"heldout_fraction": 0.5, "seed": 0}}}


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
        sae.save(root / "sae" / layer, TRAINED)
    store = FakeStore(arrays, prov, labels.tolist())
    config = AnalysisConfig(n_perm=300, top=32, min_images=10, match_threshold=0.5,
                            embed="pca", curve_reps=50, bootstrap=500)
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
    assert {"paper_ratio_5x5", "p_raw_5x5", "q_raw_5x5", "p_scale_5x5", "attribution_5x5",
            "top_category", "firing_rate", "alive", "dominant", "robust_dominant",
            "p_isotropic_1x1"} <= set(rows[0])
    typed = read_latent_table(out / "latents.csv", "mixed4a")
    assert [r["latent"] for r in typed] == list(range(N_LAT))
    for r in typed:
        assert isinstance(r["alive"], bool) and isinstance(r["top_images"], list)
        q = r["q_raw_5x5"]
        assert (np.isnan(q) and not r["alive"]) or 0 <= q <= 1
        assert r["specialization_5x5"] == (pytest.approx(1 - q) if q <= summary["config"]["q"]
                                           else 0.0)
        assert r["dominant"] in ("none", "1x1", "3x3", "5x5", "pool")
    layers_rows = list(csv.DictReader(open(out / "layers.csv")))
    assert len(layers_rows) == 2 * 4
    assert "p-values" in summary["pvalue_note"]
    # where the time went, per step (summed over layers) and per layer
    steps = summary["seconds"]["per_step_over_layers"]
    assert {"activity", "branch_tests", "null_controls", "relabelling_null", "power",
            "data_baseline", "paper_curves", "categories", "figures_knn_embedding"} <= set(steps)
    assert sum(steps.values()) <= summary["seconds"]["total"] + 1
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
        assert s["tested"] == N_LAT and s["dead_in_training"] == 0
        for name, c in s["null_controls"].items():
            if not c.get("reference_only"):
                assert c["significant"] <= c["bound_q_m"], name
        assert s["knn_branch_agreement"]["n_labelled"] > 0
        # Data side on the SAE's held-out images only: half of the 120 images.
        assert "held-out" in s["data_split"] and s["heldout_vectors"] == N_IMG // 2 * POS
        pc = s["paper_curve"]["raw"]["5x5"]
        assert pc["count_gt_0.5"] > pc["null_count_gt_0.5_q95"]
        # Controls that can fail, on planted branch structure: the real partition beats every
        # relabelled one, the scale rule can see every branch, the SAE beats the data's
        # covariance (planted latents are far more specialised than the mixed activations).
        rel = s["relabelling_null"]
        assert rel["p_value"] == pytest.approx(1 / (rel["replicates"] + 1))
        assert all(c["testable_for_scale"] for c in s["power"]["branches"].values())
        vs = s["data_baseline"]["families"]["covariance_gaussian"]["sae_minus_data"]
        assert vs["difference"] > 0 and vs["p_value"] < 0.05


def test_cross_layer_and_category_results(run):
    _, summary, _, _ = run
    cl = summary["cross_layer"][0]
    assert cl["layers"] == list(LAYERS) and cl["aligned_samples"] == N_IMG // 2 * POS
    c = cl["consistency"]
    assert c["matched_pairs"] > 0.8 * N_LAT
    assert c["agreement"] > 0.8 and c["p_value"] < 0.01 and c["kappa"] > 0.6
    # The matching's own null (images shifted) finds almost no pairs above the threshold.
    assert max(cl["shifted_image_null"]["pairs_above_threshold_per_replicate"]) < 0.05 * N_LAT
    cat = summary["per_layer"]["mixed4a"]["category_test"]["dominant"]["5x5"]
    assert cat["difference"] > 0.1 and cat["ci_low"] > 0 and cat["significant"]


def test_claims_table(run):
    _, summary, _, _ = run
    claims = {c["id"]: c for c in summary["claims"]}
    assert list(claims) == ["specialise", "five_by_five", "animals", "animals_causal",
                            "across_layers", "paper_curve"]
    assert claims.pop("animals_causal")["verdict"] == "not run"  # the effects stage decides it
    assert claims["specialise"]["verdict"] == "supported"
    assert claims["animals"]["verdict"] in ("supported", "explained by channel scale")
    assert claims["across_layers"]["verdict"] == "supported"
    assert claims["paper_curve"]["verdict"] == "not testable"  # mixed4c was not analysed
    for c in claims.values():
        assert c["evidence"] and c["verdict"] in ("supported", "not supported",
                                                  "explained by channel scale", "not testable")
    assert "claims of the paper" in format_table(summary)


def _tiny_run(root, store, dead_fraction=0.0, meta=TRAINED):
    from branchlens.sae import SAEConfig, TopKSAE

    sl = branch_slices("bvlc_googlenet", "mixed4a")
    cfg = SAEConfig(d_in=512, n_latents=64, k=4, decoder="untied", layer="mixed4a",
                    variant="bvlc_googlenet", dead_after=100,
                    branch_slices={b: [s.start, s.stop] for b, s in sl.items()})
    sae = TopKSAE(cfg, seed=1)
    with torch.no_grad():
        sae.since_fired[: int(dead_fraction * 64)] = 10**6
    sae.save(root / "sae" / "mixed4a", meta)
    return root


def _tiny_store():
    rng = np.random.default_rng(0)
    prov = np.array([(i, p // 14, p % 14, 0) for i in range(20) for p in range(8)], np.int64)
    x = np.abs(rng.standard_normal((len(prov), 512))).astype(np.float32)
    return FakeStore({"mixed4a": x}, prov, list(range(20)))


def test_bad_runs_give_one_line_errors_naming_the_layer(tmp_path):
    store = _tiny_store()
    fast = AnalysisConfig(n_perm=100, embed="none", curve_reps=10, bootstrap=50)
    with pytest.raises(AnalysisError, match="no trained SAEs"):
        analyze(tmp_path, store=store, config=fast)
    with pytest.raises(AnalysisError, match="mixed4b: no trained SAE.*branchlens train"):
        analyze(_tiny_run(tmp_path / "a", store), layers=["mixed4b"], store=store, config=fast)
    half = {**TRAINED, "train": {**TRAINED["train"], "step": 3}}
    with pytest.raises(AnalysisError, match="mixed4a: the SAE is half-trained"):
        analyze(_tiny_run(tmp_path / "b", store, meta=half), store=store, config=fast)
    other = {**TRAINED, "store_hash": "another-store"}
    with pytest.raises(AnalysisError, match="mixed4a: the SAE was trained on another store"):
        analyze(_tiny_run(tmp_path / "c", store, meta=other), store=store, config=fast)


def test_layer_with_almost_every_latent_dead_is_analysed_with_a_warning(tmp_path):
    store = _tiny_store()
    fast = AnalysisConfig(n_perm=100, embed="none", curve_reps=10, bootstrap=50)
    summary = analyze(_tiny_run(tmp_path, store, dead_fraction=0.95), store=store, config=fast)
    s = summary["per_layer"]["mixed4a"]
    assert s["dead_in_training"] == 60 and s["tested"] <= 4
    assert s["warning"] and "dead" in s["warning"]
    rows = list(csv.DictReader(open(tmp_path / "analysis" / "latents.csv")))
    assert all(r["alive"] == "False" and r["dominant"] == "none" for r in rows[:60])
