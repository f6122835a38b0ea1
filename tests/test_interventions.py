"""Interventions: α = 1 is the network, ablation removes exactly the latent's part, a planted
latent that is a class's only path drops that class alone, and the causal animal test finds a
planted animal branch (and not a reversed one)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from branchlens import interventions as I
from branchlens.cli import app
from branchlens.model import InceptionV1
from branchlens.sae import SAEConfig, TopKSAE

V = "bvlc_googlenet"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return InceptionV1(V).eval()


def _sae(net, layer: str, k: int = 8, expansion: int = 1) -> TopKSAE:
    sae = TopKSAE(SAEConfig.for_layer(V, layer, expansion=expansion, k=k), seed=1)
    with torch.no_grad():
        h = net(torch.rand(2, 3, 96, 96), [layer])[layer]
        sae.init_from_sample(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]))
    return sae


def test_scale_one_is_the_unmodified_network_on_blocks_and_branches(net):
    x = torch.rand(3, 3, 96, 96)
    for layer in ("mixed4c", "mixed4c_5x5"):
        sae = _sae(net, layer)
        with torch.no_grad():
            z = sae.encode(net(x, [layer])[layer], channel_dim=1)
        ids = z.sum((0, 2, 3)).argsort(descending=True)[:2].tolist()
        res = I.intervene(net, sae, layer, x, ids, scale=1.0)
        with torch.no_grad():
            plain = net(x)
        assert torch.allclose(res.before, plain, atol=1e-5)
        assert torch.equal(res.before, res.after)
        assert res.summary()["max_abs_delta_prob"] == 0.0
        moved = I.intervene(net, sae, layer, x, ids, scale=3.0)
        assert moved.summary()["max_abs_delta_prob"] > 0


def test_ablation_removes_exactly_the_latents_share_of_the_activation(net):
    layer = "mixed4a"
    sae = _sae(net, layer)
    with torch.no_grad():
        h = net(torch.rand(2, 3, 96, 96), [layer])[layer]
        z = sae.encode(h, channel_dim=1)  # dense [B, n, H, W]
    ids = torch.tensor([int(z.sum((0, 2, 3)).argmax()), 5])
    delta = I.latent_delta(sae, h, ids, torch.zeros(2))
    want = -torch.einsum("blhw,lc->bchw", z[:, ids], sae.decoder_directions()[ids])
    assert torch.allclose(delta, want, atol=1e-5) and delta.abs().sum() > 0
    only = torch.zeros(h.shape[-2:], dtype=torch.bool)
    only[0, 0] = True
    local = I.latent_delta(sae, h, ids, torch.zeros(2), positions=only)
    assert torch.allclose(local[..., 0, 0], want[..., 0, 0], atol=1e-5)
    assert local[..., 1:, :].abs().sum() == 0 and local[..., 0, 1:].abs().sum() == 0


def test_a_latent_that_is_the_only_path_to_a_class_drops_that_class_and_no_other():
    torch.manual_seed(0)
    net = InceptionV1(V).eval()
    layer, target, cls = "mixed5b", 7, 291  # lion
    sae = _sae(net, layer, k=4)
    with torch.no_grad():
        sae.b_latent[target] = 1e3  # always among the top k: fires everywhere
        d = sae.decoder_directions()[target]
        W = net.classifier.weight
        W -= torch.outer(W @ d, d) / d.dot(d)  # no class reads d ...
        W[cls] = 40 * d / d.dot(d)  # ... except the lion, which reads only d
    x = torch.rand(4, 3, 96, 96)
    res = I.intervene(net, sae, layer, x, [target], scale=0.0)
    dlogit = res.after - res.before
    others = torch.ones(1000, dtype=torch.bool)
    others[cls] = False
    assert (dlogit[:, cls] < -1).all()
    assert dlogit[:, others].abs().max() < 1e-3
    dp = res.delta_p
    assert (dp[:, cls] < 0).all() and (dp[:, others] >= -1e-7).all()
    promotes, suppresses = I.named_classes(dp.mean(0, keepdim=True), [f"c{i}" for i in range(1000)])
    assert promotes[0].startswith(f"c{cls} ") and f"c{cls} " not in suppresses[0]


def test_bad_interventions_are_refused_before_any_forward_pass(net):
    sae = _sae(net, "mixed4a")
    n = sae.cfg.n_latents
    with pytest.raises(ValueError, match=f"out of range.*0..{n - 1}"):
        I.check_latents(sae, [n])
    with pytest.raises(ValueError, match="out of range"):
        I.check_latents(sae, [-1])
    alive = np.ones(n, bool)
    alive[3] = False
    with pytest.raises(ValueError, match="dead"):
        I.check_latents(sae, [3], alive=alive)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            I.check_latents(sae, [1], bad)
    with pytest.raises(ValueError, match="2 scales for 1"):
        I.check_latents(sae, [1], [0.0, 1.0])
    with pytest.raises(ValueError, match="no latents"):
        I.check_latents(sae, [])


def test_matched_controls_pick_the_nearest_unused_latents():
    feats = np.array([[0.0, 0], [5, 5], [0.1, 0], [5, 5.1], [9, 9], [0.2, 0.1]])
    chosen = I.matched_controls(np.array([0, 1]), np.array([2, 3, 4, 5]), feats)
    assert chosen.tolist() == [2, 3]
    with pytest.raises(ValueError, match="candidate"):
        I.matched_controls(np.array([0, 1, 2]), np.array([3, 4]), feats)


def test_grouped_bootstrap_covers_the_truth_and_respects_groups():
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(40):
        v = rng.normal(0.3, 1, 200)
        m, lo, hi = I.grouped_bootstrap(v, np.arange(200), 400, seed=rep)
        hits += lo <= 0.3 <= hi
    assert hits >= 34  # ~95 % coverage
    v = rng.normal(0, 1, 50)
    dup = np.repeat(v, 2)  # every value twice (an image and its flip): no extra information
    _, lo1, hi1 = I.grouped_bootstrap(dup, np.arange(100), 2000)
    _, lo2, hi2 = I.grouped_bootstrap(dup, np.arange(100) // 2, 2000)
    assert hi2 - lo2 > 1.3 * (hi1 - lo1)
    est, lo, hi = I.grouped_bootstrap(np.full(10, 2.0), np.arange(10), 200, denom=np.full(10, 4.0))
    assert est == lo == hi == 0.5


def _planted_branch_world(reverse: bool = False):
    """8 channels, a linear head: animal classes read channels 0–3, the rest 4–7. The 8
    latents labelled 5x5 write into 0–3 (4–7 when ``reverse``), the 8 labelled 1x1 the other
    half."""
    torch.manual_seed(0)
    d, n = 8, 16
    cfg = SAEConfig(d_in=d, n_latents=n, k=n, decoder="tied", b_pre_init="zeros", layer="toy")
    sae = TopKSAE(cfg, seed=0)
    w = torch.rand(n, d) * 0.1
    w[:8, :4] += torch.rand(8, 4)
    w[8:, 4:] += torch.rand(8, 4)
    with torch.no_grad():
        sae.W_enc.copy_(w / w.norm(dim=1, keepdim=True))
    head = torch.zeros(1000, d)
    animal = torch.as_tensor(I.ANIMAL_CLASSES)
    head[:, 4:] = 0.3
    head[animal] = 0
    head[animal, :4] = 0.3

    def go(h):
        return h.mean((2, 3)) @ head.T

    h = torch.rand(60, d, 2, 2) + 0.5
    robust = np.array((["1x1"] * 8 + ["5x5"] * 8) if reverse else (["5x5"] * 8 + ["1x1"] * 8))
    rate = np.full(n, 0.5) + np.linspace(0, 0.01, n)
    mass = np.full(n, 1.0)
    return go, sae, h, robust, rate, mass


def test_the_causal_test_finds_a_planted_animal_branch_and_rejects_a_reversed_one():
    from branchlens.analysis.claims import animals_causal

    results = {}
    for reverse in (False, True):
        go, sae, h, robust, rate, mass = _planted_branch_world(reverse)
        groups = np.arange(h.shape[0]) // 2
        res = I.causal_branch_test(go, sae, h, groups, robust, np.ones(16, bool), rate, mass,
                                   "5x5", ["1x1"], ("5x5", slice(0, 4)), n_boot=500)
        assert res["testable"] and len(set(res["controls"])) == 8
        assert all(robust[c] == "1x1" for c in res["controls"])
        results[reverse] = res
    ok, rev = results[False], results[True]
    assert ok["drop_target"] > 0 > ok["drop_matched"]
    assert ok["difference"]["ci_low"] > 0
    assert rev["difference"]["ci_high"] < 0
    assert ok["drop_branch"] > 0 and ok["latent_share_of_branch"]["mean"] > 0
    assert animals_causal({"a": ok, "b": ok, "c": rev})["verdict"] == "supported"
    assert animals_causal({"a": rev, "b": rev, "c": ok})["verdict"] == "not supported"
    few = I.causal_branch_test(go, sae, h[:10], np.arange(10), robust, np.ones(16, bool), rate,
                               mass, "5x5", ["1x1"], None)
    assert not few["testable"] and "held-out images" in few["why"]
    assert animals_causal({"a": few})["verdict"] == "not testable"


def test_effects_and_steer_on_a_finished_run(e2e_run, tmp_path):
    src, _ = e2e_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    cli = CliRunner()
    res = cli.invoke(app, ["effects", str(run), "--layers", "mixed4a", "--scope", "all",
                           "--top-images", "2", "--n-boot", "100", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    claim = json.loads(res.output.strip().splitlines()[-1])["claim"]
    assert claim["id"] == "animals_causal" and claim["verdict"] == "not testable"
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    ids = [c["id"] for c in summary["claims"]]
    assert ids.index("animals_causal") == ids.index("animals") + 1 and ids.count(
        "animals_causal") == 1
    table = (run / "effects" / "latents_mixed4a.csv").read_text().splitlines()
    assert table[0].startswith("latent,n_images,promotes,suppresses")
    assert len(table) > 1
    doc = json.loads((run / "effects" / "mixed4a.json").read_text())
    assert doc["latents_ablated"] == len(table) - 1 and "sae_sha256" in json.dumps(doc)

    alive = [int(r.split(",")[0]) for r in table[1:]]
    res = cli.invoke(app, ["steer", str(run), "--layer", "mixed4a", "--latents",
                           str(alive[0]), "--scale", "1", "--n-images", "2", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["max_abs_delta_prob"] == 0.0 and 1 <= got["n_images"] <= 2
    res = cli.invoke(app, ["steer", str(run), "--layer", "mixed4a", "--latents",
                           str(alive[0]), "--scale", "0", "--n-images", "2"])
    assert res.exit_code == 0 and "before:" in res.output and "after:" in res.output
    for args, msg in ((["--latents", "99999"], "out of range"),
                      (["--latents", "0", "--scale", "nan"], "finite"),
                      (["--latents", "0", "--layer", "mixed4e"], "no SAE for layer")):
        base = ["steer", str(run), "--layer", "mixed4a"]
        if "--layer" in args:
            base = ["steer", str(run)]
        res = cli.invoke(app, base + args)
        assert res.exit_code == 2 and msg in res.output, res.output


def test_batched_per_latent_ablations_equal_one_intervention_each(net):
    layer = "mixed4c"
    sae = _sae(net, layer)
    x = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        h = net(x, [layer])[layer]
    codes = I.sparse_codes(sae, h, batch=2)
    dense = sae.encode(h, channel_dim=1)
    assert torch.allclose(codes.image_max(sae.cfg.n_latents), dense.amax((2, 3)), atol=1e-6)
    go = I.tail(net, layer)
    clean = I.clean_probabilities(go, h)
    order = dense.sum((0, 2, 3)).argsort(descending=True)
    lat = order[:3].tolist()
    tops = [[0, 2], [1], [0, 1, 2]]
    dp = I.ablation_effects(go, sae, h, codes, clean, tops, lat, batch_size=2)
    for j, imgs in enumerate(tops):
        one = I.intervene(net, sae, layer, x[imgs], [lat[j]], 0.0).delta_p.mean(0)
        assert torch.allclose(dp[j], one, atol=1e-6)


def test_the_causal_claim_is_re_decided_on_every_replicate_sae(e2e_run, tmp_path):
    src, _ = e2e_run
    run = tmp_path / "run"
    shutil.copytree(src, run, symlinks=True)
    rep = run / "replicates" / "seed1"
    rep.mkdir(parents=True)
    (rep / "store").symlink_to("../../store")
    shutil.copytree(run / "sae", rep / "sae")
    shutil.copytree(run / "analysis", rep / "analysis")
    (run / "analysis" / "stability.json").write_text(json.dumps(
        {"layers": ["mixed4a"], "seeds": [0, 1], "replicates": 2}))
    res = CliRunner().invoke(app, ["effects", str(run), "--layers", "mixed4a", "--scope", "none",
                                   "--n-boot", "50", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    claim = json.loads(res.output.strip().splitlines()[-1])["claim"]
    st = claim["stability"]
    assert st["replicates"] == 2 and st["layers"] == ["mixed4a"]
    assert st["verdicts"] == [claim["verdict"]] * 2 and st["stable"]
    assert list(claim["numbers"]["replicates"]) == ["seed1"]
    assert not (run / "effects" / "latents_mixed4a.csv").exists()  # none: no labels written
    res = CliRunner().invoke(app, ["effects", str(run), "--layers", "mixed4b", "--scope", "none",
                                   "--n-boot", "50", "--no-progress", "--json"])
    claim = json.loads(res.output.strip().splitlines()[-1])["claim"]
    assert list(claim["numbers"]["per_layer"]) == ["mixed4a", "mixed4b"]  # adds, never drops
    (run / "sae" / "mixed4a" / "weights.safetensors").write_bytes(
        (run / "sae" / "mixed4b" / "weights.safetensors").read_bytes())  # "retrained"
    res = CliRunner().invoke(app, ["effects", str(run), "--layers", "mixed4b", "--scope", "none",
                                   "--n-boot", "50", "--no-progress", "--json"])
    claim = json.loads(res.output.strip().splitlines()[-1])["claim"]
    assert list(claim["numbers"]["per_layer"]) == ["mixed4b"]


def test_fewer_candidates_than_targets_match_a_random_subset_of_the_targets():
    go, sae, h, robust, rate, mass = _planted_branch_world()
    robust = robust.copy()
    robust[14:] = "none"  # 8 targets, 6 candidates
    res = I.causal_branch_test(go, sae, h, np.arange(h.shape[0]) // 2, robust, np.ones(16, bool),
                               rate, mass, "5x5", ["1x1"], ("5x5", slice(0, 4)), n_boot=200)
    assert res["testable"] and res["latents"] == 8 and res["latents_used"] == 6
    assert sorted(res["controls"]) == list(range(8, 14))
    robust[10:] = "none"  # 2 candidates: not enough for a test
    few = I.causal_branch_test(go, sae, h, np.arange(h.shape[0]) // 2, robust, np.ones(16, bool),
                               rate, mass, "5x5", ["1x1"], None)
    assert not few["testable"] and "other branches" in few["why"]
