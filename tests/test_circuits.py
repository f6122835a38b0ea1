"""Circuits on the real network: exact decomposition, causal agreement, flow null."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _vizkit as K
from branchlens.variants import branch_slices
from branchlens.viz import circuits as C
from branchlens.viz.examples import TopExamples, latent_maps_of

UP, DOWN = "mixed4a", "mixed4b"


def _setup(n_latents=6, n_images=2):
    model, x = K.model(), K.inputs()
    sae_up, sae_down = K.trained_sae(UP), K.trained_sae(DOWN)
    top = TopExamples.empty(DOWN, sae_down.cfg.n_latents, n_images)
    top.update(latent_maps_of(model, sae_down, DOWN, x), range(len(x)))
    active = [j for j in range(top.values.shape[0]) if top.values[j, 0] > 0]
    latents = active[:: max(1, len(active) // n_latents)][:n_latents]
    targets = C.targets_from_top(top, latents, n_images)
    x_up = K.activations(UP)[[t.image for t in targets]]
    att = C.attribute(K.model(), sae_up, sae_down, UP, DOWN, x_up, targets)
    return model, x, sae_up, sae_down, targets, att


def test_forward_between_equals_the_model_and_zeroed_branch_is_exact():
    K.need_shared()
    model, x = K.model(), K.inputs()[:2]
    with torch.no_grad():
        ref = model(x, [UP, DOWN])
        assert torch.equal(C.forward_between(model, ref[UP], UP, DOWN), ref[DOWN])
        sl = branch_slices(model.variant, UP)["5x5"]
        with C.zeroed_branch(model, UP, "5x5"):
            z = model(x, [UP])[UP]
        assert z[:, sl].abs().max() == 0
        others = torch.ones(z.shape[1], dtype=torch.bool)
        others[sl] = False
        assert torch.equal(z[:, others], ref[UP][:, others])
        assert torch.equal(model(x, [UP])[UP], ref[UP])  # hook removed
    with pytest.raises(ValueError):
        C.forward_between(model, ref[DOWN], DOWN, UP)


def test_attribution_decomposes_exactly_and_agrees_with_branch_ablation():
    K.need_shared()
    model, x, sae_up, sae_down, targets, att = _setup()
    # Σ_i z_i d_i·∇ + ε·∇ + b·∇ == x_L·∇ (= Σ over branches), an exact identity
    total = att.latents.sum(1) + att.error + att.bias
    assert torch.allclose(total, att.branches.sum(1), rtol=1e-4, atol=1e-3)
    # the value is the downstream latent's real pre-activation
    with torch.no_grad():
        y = model(x[[t.image for t in targets]], [DOWN])[DOWN]
        vec = torch.stack([y[k, :, t.y, t.x] for k, t in enumerate(targets)])
        ref = sae_down.encode_pre(vec)[range(len(targets)), [t.latent for t in targets]]
    assert torch.allclose(att.value, ref, atol=1e-4)
    assert ((att.error_share() >= 0) & (att.error_share() <= 1)).all()
    # causal check: zeroing a branch in the real forward pass drops the latent roughly by
    # that branch's gradient × activation, and the biggest predicted drop is the biggest one
    clean, drops, names = C.branch_ablation(model, sae_down, UP, DOWN,
                                            x[[t.image for t in targets]], targets)
    assert torch.allclose(clean, att.value, atol=1e-4)
    r = np.corrcoef(drops.flatten().numpy(), att.branches.flatten().numpy())[0, 1]
    assert r > 0.8, r
    agree = (drops.argmax(1) == att.branches.argmax(1)).float().mean()
    assert agree >= 0.75
    dom_up, names = K.excess_share_labels(sae_up.decoder_directions(), UP)
    rows = C.top_upstream(att, dom_up, names, top_k=5)
    assert len(rows) == len({t.latent for t in targets})
    for row in rows:
        shares = [u["share"] for u in row["upstream"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-6
        assert all(u["dominant"] in names for u in row["upstream"])


def test_branch_flow_detects_a_planted_pathway_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    n_up, n_down, names = 200, 40, ["1x1", "3x3", "5x5", "pool"]
    dom_up = np.arange(n_up) % 4
    dom_down = np.arange(n_down) % 4
    a = torch.rand(n_down, n_up, generator=g)
    flow = C.branch_flow(a, dom_down, dom_up, names, n_perm=300)
    assert (flow.p_value > 0.01).all()  # no structure -> nothing significant
    planted = a.clone()
    five = torch.tensor(dom_up == 2)
    planted[torch.tensor(dom_down == 2)[:, None] & five[None, :]] *= 3
    flow = C.branch_flow(planted, dom_down, dom_up, names, n_perm=300)
    assert flow.p_value[2, 2] < 0.01
    assert flow.observed[2, 2] > flow.null_mean[2, 2] + 3 * flow.null_std[2, 2]
    assert np.allclose(flow.observed.sum(1), 1.0)
    assert flow.to_dict()["n_down"] == [10, 10, 10, 10]
