"""Objectives read the right numbers, branch restriction is exact, encoders are read off."""

from __future__ import annotations

import pytest
import torch

from _vizkit import StandInSAE
from branchlens.sae import SAEConfig, TopKSAE
from branchlens.variants import branch_slices
from branchlens.viz import objectives as O
from branchlens.viz.latents import encoder_affine

V, L = "bvlc_googlenet", "mixed4a"


def _sae(seed=0, d=512, n=64):
    cfg = SAEConfig.for_layer(V, L, expansion=1, k=4)
    cfg.n_latents = n
    sae = TopKSAE(cfg, seed=seed)
    with torch.no_grad():
        sae.b_pre.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_latent.normal_(generator=torch.Generator().manual_seed(2))
    sae.cfg.scale = 0.7
    return sae


def test_encoder_affine_matches_encode_pre_for_real_and_stand_in_saes():
    sae = _sae()
    enc = encoder_affine(sae, 512)
    x = torch.randn(5, 512)
    assert torch.allclose(x @ enc.W.t() + enc.c, sae.encode_pre(x), atol=1e-4)
    g = torch.Generator().manual_seed(0)
    stand = StandInSAE(torch.randn(32, 8, generator=g), torch.randn(32, generator=g),
                       torch.randn(8, generator=g), torch.randn(32, 8, generator=g), 3)
    enc2 = encoder_affine(stand, 8)
    y = torch.randn(4, 8)
    assert torch.allclose(y @ enc2.W.t() + enc2.c, stand.encode_pre(y), atol=1e-5)

    class NotAffine:
        def encode_pre(self, x):
            return torch.relu(x)

    with pytest.raises(ValueError, match="not affine"):
        encoder_affine(NotAffine(), 8)


def test_sae_latent_objective_centre_mean_and_branch():
    sae = _sae()
    acts = {L: torch.randn(3, 512, 5, 7)}
    lat = [4, 9, 4]
    centre = O.sae_latent(sae, L, lat)(acts)
    ref = sae.encode_pre(acts[L][:, :, 2, 3])[torch.arange(3), lat]
    assert torch.allclose(centre, ref, atol=1e-4)
    mean = O.sae_latent(sae, L, lat, position="mean")(acts)
    per_pos = sae.encode_pre(acts[L].permute(0, 2, 3, 1).reshape(-1, 512)).view(3, 35, -1)
    assert torch.allclose(mean, per_pos.mean(1)[torch.arange(3), lat], atol=1e-4)
    # branch-restricted: only the 5x5 slice of the encoder row, and no gradient elsewhere
    sl = branch_slices(V, L)["5x5"]
    x = acts[L].clone().requires_grad_(True)
    val = O.sae_latent(sae, L, lat, branch="5x5", variant=V)({L: x})
    W = encoder_affine(sae, 512).W
    assert torch.allclose(val, (W[lat][:, sl] * x[:, sl, 2, 3]).sum(1), atol=1e-4)
    val.sum().backward()
    g = x.grad[:, :, 2, 3].abs()
    assert g[:, sl].sum() > 0 and g[:, :sl.start].sum() == 0 and g[:, sl.stop:].sum() == 0
    with pytest.raises(ValueError):
        O.sae_latent(sae, L, lat, branch="5x5")  # needs the variant


def test_direction_objective_is_cosine_weighted():
    v = torch.randn(2, 16)
    along = {L: (3 * v).view(2, 16, 1, 1)}
    val = O.direction(L, v)(along)
    assert torch.allclose(val, 3 * v.norm(dim=1), atol=1e-4)  # dot = ‖x‖, cos = 1
    ortho = torch.randn(2, 16)
    ortho -= (ortho * v).sum(1, keepdim=True) / v.pow(2).sum(1, keepdim=True) * v
    tilted = {L: (v + 5 * ortho).view(2, 16, 1, 1)}
    plain = O.direction(L, v, cossim_pow=0.0)(tilted)
    weighted = O.direction(L, v, cossim_pow=1.0)(tilted)
    assert torch.all(weighted < plain)  # same dot, penalised for pointing away


def test_channel_neuron_and_arithmetic():
    a = torch.randn(2, 8, 3, 3)
    acts = {L: a}
    assert torch.allclose(O.channel(L, [1, 5])(acts), torch.stack([a[0, 1].mean(),
                                                                   a[1, 5].mean()]))
    assert torch.allclose(O.neuron(L, 2)(acts), a[:, 2, 1, 1])
    combo = 2 * O.neuron(L, 2) - O.channel(L, 2)
    assert torch.allclose(combo(acts), 2 * a[:, 2, 1, 1] - a[:, 2].mean((1, 2)))
    with pytest.raises(ValueError):
        O.channel(L, [1, 2, 3])(acts)


