"""TopK SAE model: sparse autograd against dense references, invariants, init, persistence."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from branchlens import sae_kernels
from branchlens.sae import (
    SAEConfig,
    TopKSAE,
    _TopKGather,
    geometric_median,
    import_paper_checkpoint,
    sparse_decode,
)
from branchlens.variants import branch_slices


def _dense_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The textbook computation: dense codes, dense matmuls, masked TopK for AuxK."""
    cfg = sae.cfg
    xs = x * cfg.scale
    pre = (xs - sae.b_pre) @ sae.W_enc.t() + sae.b_latent
    idx = pre.topk(cfg.k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    W = sae.W_dec_rows
    xhat = z @ W + sae.b_pre
    err = (xhat - xs).pow(2).sum(1)
    if cfg.loss == "paper":
        loss = (err / xs.pow(2).sum(1)).mean()
    else:
        loss = err.mean() / cfg.var_total
    if cfg.aux and dead.any():
        masked = pre.masked_fill(~dead, -float("inf"))
        aidx = masked.topk(min(cfg.k_aux, int(dead.sum())), dim=1).indices
        za = torch.zeros_like(pre).scatter(1, aidx, pre.gather(1, aidx)).relu()
        resid = (xs - xhat).detach()
        loss = loss + cfg.aux_coef * ((za @ W) - resid).pow(2).sum() / resid.pow(2).sum()
    return loss


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("decoder", ["untied", "tied"])
@pytest.mark.parametrize("loss", ["fvu", "paper"])
def test_sparse_loss_and_gradients_match_dense_reference(decoder, loss, kernels, monkeypatch):
    monkeypatch.setattr(sae_kernels, "ENABLED", kernels and sae_kernels.AVAILABLE)
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=12, n_latents=48, k=4, decoder=decoder, loss=loss, aux=True, k_aux=6,
                    dead_after=1)
    sae = TopKSAE(cfg, seed=1)
    x = torch.randn(9, 12).abs()
    sae.init_from_sample(x)
    sae.double()
    with torch.no_grad():
        sae.b_latent.normal_(0, 0.3)
        if decoder == "untied":
            sae.W_dec.add_(0.1 * torch.randn_like(sae.W_dec))
    sae.since_fired[::2] = 5  # half the latents dead: exercises AuxK
    x = x.double()
    got, _ = sae.loss(x, dead=sae.dead_mask())
    ref = _dense_loss(sae, x, sae.dead_mask())
    params = list(sae.parameters())
    g_got = torch.autograd.grad(got, params)
    g_ref = torch.autograd.grad(ref, params)
    assert torch.allclose(got, ref, atol=1e-12)
    for (name, _), a, b in zip(sae.named_parameters(), g_got, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10), name
    got, _ = sae.loss(x, dead=sae.dead_mask())  # a scaled loss scales every gradient
    for a, b in zip(torch.autograd.grad(3 * got, params), g_ref, strict=True):
        assert torch.allclose(a, 3 * b, atol=1e-10)


@pytest.mark.skipif(not sae_kernels.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_kernels_match_torch_topk(dtype):
    """Same k-sets as torch.topk for wide and narrow rows, ties, k up to n, and rows with NaN
    (indices stay in range and distinct)."""
    rng = np.random.default_rng(0)
    for (n, k), zero_bias in itertools.product(
            [(8192, 32), (13312, 32), (200, 150), (7, 3), (64, 64), (33, 1)], [False, True]):
        pre = rng.standard_normal((6, n)).astype(dtype)
        pre[1] = np.round(pre[1])  # many ties (with the zero bias)
        pre[2] = 0.0  # all tied
        bias = np.zeros(n, dtype) if zero_bias else rng.standard_normal(n).astype(dtype)
        v, i = np.empty((6, k), dtype), np.empty((6, k), np.int64)
        sae_kernels.topk_rows(0, 6, pre, bias, v, i)
        full = pre + bias
        assert np.array_equal(np.take_along_axis(full, i, 1), v)
        assert np.array_equal(-np.sort(-v, 1), -np.sort(-full, 1)[:, :k])
        assert all(len(set(row)) == k for row in i)
        cols = rng.permutation(n)[:max(k, n // 3)]
        vc, ic = np.empty((6, k), dtype), np.empty((6, k), np.int64)
        sae_kernels.topk_cols(0, 6, pre, bias, cols, vc, ic)
        assert np.isin(ic, cols).all() and all(len(set(row)) == k for row in ic)
        assert np.array_equal(-np.sort(-vc, 1), -np.sort(-full[:, cols], 1)[:, :k])
    pre[3, ::5] = np.nan
    sae_kernels.topk_rows(0, 6, pre, bias, v, i)
    assert ((i >= 0) & (i < pre.shape[1])).all() and all(len(set(row)) == k for row in i)


def test_gradcheck_sparse_primitives():
    torch.manual_seed(0)
    B, n, d, k = 5, 11, 4, 3
    xc = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    idx = (xc @ W.t() + b).topk(k, dim=1).indices.detach()

    def enc(xc, W, b):
        return _TopKGather.apply(xc, W, b, (xc @ W.t() + b).gather(1, idx).detach(), idx)

    assert torch.autograd.gradcheck(enc, (xc, W, b))
    vals = torch.randn(B, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, idx, w), (vals, W))


def test_sparse_backward_touches_only_selected_rows():
    cfg = SAEConfig(d_in=8, n_latents=64, k=2, aux=False)
    sae = TopKSAE(cfg)
    x = torch.randn(3, 8)
    loss, st = sae.loss(x)
    loss.backward()
    used = torch.zeros(64, dtype=torch.bool)
    used[st["idx"].flatten()] = True
    assert sae.W_enc.grad[~used].abs().max() == 0
    assert sae.W_dec.grad[~used].abs().max() == 0
    assert sae.W_enc.grad[used].abs().sum(1).min() > 0


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_gradients_accumulate_and_step_buffers_are_reused(kernels, monkeypatch):
    """Two losses backpropagated in turn add up in .grad (a reused buffer never overwrites a
    live gradient); step after step, the kernels' weight gradients reuse one buffer."""
    monkeypatch.setattr(sae_kernels, "ENABLED", kernels and sae_kernels.AVAILABLE)
    torch.manual_seed(0)
    x = torch.rand(64, 16)
    a, b = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4)), TopKSAE(SAEConfig(16, 64, k=4))
    a.init_from_sample(x)
    b.init_from_sample(x)
    a.loss(x[:32])[0].backward()
    a.loss(x[32:])[0].backward()
    g1 = torch.autograd.grad(b.loss(x[:32])[0], list(b.parameters()))
    g2 = torch.autograd.grad(b.loss(x[32:])[0], list(b.parameters()))
    for p, u, v in zip(a.parameters(), g1, g2, strict=True):
        assert torch.allclose(p.grad, u + v, atol=1e-6)
    opt = torch.optim.Adam(b.parameters(), lr=1e-3)
    ptrs = set()
    for _ in range(3):
        loss, _ = b.loss(x)
        loss.backward()
        ptrs.add(b.W_dec.grad.data_ptr())
        opt.step()
        opt.zero_grad(set_to_none=True)
    if sae_kernels.ENABLED:
        assert len(ptrs) == 1
    b.update(b.loss(x)[0], opt)
    assert all(p.grad is None for p in b.parameters())  # consumed by the step, memory reusable


def test_encode_decode_and_directions_in_input_units():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=5))
    x = 7.0 * torch.rand(20, 16)
    sae.init_from_sample(x)
    assert abs(float((x * sae.cfg.scale).pow(2).sum(1).mean()) - 16) < 1e-3
    z = sae.encode(x)
    assert ((z != 0).sum(1) <= 5).all() and (z >= 0).all()
    xhat, info = sae(x)
    assert torch.allclose(xhat, sae.decode(z), atol=1e-5)
    one = torch.zeros(1, 64)
    one[0, 3] = 1.0
    direction = sae.decode(one) - sae.decode(torch.zeros(1, 64))
    assert torch.allclose(direction[0], sae.decoder_directions()[3], atol=1e-6)
    assert torch.allclose(sae.encode_pre(x).gather(1, info["idx"]).relu(), info["vals"],
                          atol=1e-5)


def _steps(sae: TopKSAE, n: int = 5) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(32, sae.cfg.d_in)
    for _ in range(n):
        loss, _ = sae.loss(x)
        sae.update(loss, opt)


def test_untied_decoder_rows_stay_unit_norm_and_parallel_grad_is_removed():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4))
    _steps(sae)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert not torch.equal(sae.W_dec, sae.W_enc)  # untied: they moved apart
    loss, _ = sae.loss(torch.randn(8, 16))
    loss.backward()
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6


def test_tied_stays_tied(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, decoder="tied"))
    assert not hasattr(sae, "W_dec") and sae.W_dec_rows is sae.W_enc
    _steps(sae)
    sae.save(tmp_path)
    back = TopKSAE.load(tmp_path)
    assert back.W_dec_rows is back.W_enc and "W_dec" not in dict(back.named_parameters())
    assert torch.equal(back.decoder_directions(), sae.decoder_directions())


def test_geometric_median_is_robust_and_stationary():
    torch.manual_seed(0)
    x = torch.randn(400, 3) * 0.1
    x[:40] += 100.0  # 10 % outliers drag the mean, not the median
    m = geometric_median(x)
    assert m.norm() < 0.1 < x.mean(0).norm()
    # Weiszfeld fixed point: the unit vectors towards the points sum to ~0 (relative to n).
    u = F.normalize(x.double() - m.double(), dim=1).sum(0)
    assert u.norm() / len(x) < 1e-3


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = SAEConfig.for_layer("bvlc_googlenet", "mixed4c", expansion=2, k=8)
    assert cfg.d_in == 512 and cfg.n_latents == 1024
    assert cfg.branch_slices == {b: [s.start, s.stop]
                                 for b, s in branch_slices("bvlc_googlenet", "mixed4c").items()}
    sae = TopKSAE(cfg)
    sae.init_from_sample(torch.rand(64, 512))
    sae.since_fired[:3] = 7
    sae.save(tmp_path, {"store_hash": "abc", "seed": 3})
    back = TopKSAE.load(tmp_path)
    x = torch.rand(5, 512)
    assert torch.equal(back(x)[0], sae(x)[0])
    assert back.cfg == sae.cfg and torch.equal(back.since_fired, sae.since_fired)
    doc = json.loads((tmp_path / "cfg.json").read_text())
    assert doc["sae"]["layer"] == "mixed4c" and doc["store_hash"] == "abc"
    assert "branchlens_version" in doc and doc["sae"]["scale"] == sae.cfg.scale


def test_inception5h_mixed4a_widths():
    cfg = SAEConfig.for_layer("inception5h", "mixed4a")
    assert (cfg.d_in, cfg.n_latents, cfg.k, cfg.decoder, cfg.aux) == (508, 8128, 32, "untied",
                                                                       True)
    assert SAEConfig(d_in=4, n_latents=8, k=2, decoder="tied").aux is False


class PaperSAE(nn.Module):
    """The paper notebook's model, written out independently for the import test."""

    def __init__(self, d: int, n: int, k: int):
        super().__init__()
        self.k = k
        self.b_pre = nn.Parameter(torch.randn(d) * 0.1)
        self.W_enc = nn.Linear(d, n, bias=False)
        self.b_latent = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        pre = self.W_enc(x - self.b_pre) + self.b_latent
        top = pre.topk(self.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        return z @ self.W_enc.weight + self.b_pre  # tied: W_dec = W_enc^T


def test_import_paper_checkpoint(tmp_path):
    torch.manual_seed(0)
    paper = PaperSAE(32, 128, 6)
    torch.save(paper.state_dict(), tmp_path / "ckpt.pt")
    sae = import_paper_checkpoint(tmp_path / "ckpt.pt", k=6)
    assert sae.cfg.decoder == "tied" and sae.cfg.loss == "paper" and sae.cfg.scale == 1.0
    x = torch.rand(10, 32) * 3
    with torch.no_grad():
        assert torch.allclose(sae(x)[0], paper(x), atol=1e-5)
    with pytest.raises(ValueError):
        import_paper_checkpoint(paper.state_dict(), layer="mixed4c", variant="bvlc_googlenet")
