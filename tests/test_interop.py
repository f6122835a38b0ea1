"""SAELens / paper export and import: same codes and reconstructions on raw activations."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from branchlens.interop import export_paper, export_run_sae, export_saelens, import_sae
from branchlens.sae import SAEConfig, TopKSAE

D, N, K = 24, 96, 5


def _trained_like(decoder: str, seed: int = 0) -> TopKSAE:
    """An SAE with every parameter non-trivial and an input scale far from 1."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, decoder=decoder), seed=seed)
    sae.init_from_sample(torch.randn(200, D) * 7 + 3)
    with torch.no_grad():
        sae.b_latent.normal_(0, 0.3)
        sae.b_pre.add_(torch.randn(D) * 0.2)
        if decoder == "untied":
            sae.W_dec.copy_(F.normalize(sae.W_dec + 0.3 * torch.randn(N, D), dim=1))
    assert abs(sae.cfg.scale - 1) > 0.5
    return sae


def _raw(n=300):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D, generator=g) * 7 + 3


def _saelens_forward(folder, x):
    """SAELens's TopK SAE written out from its documented formulas, on the files alone."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == "topk" and t["W_enc"].shape == (D, N)
    sae_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    top = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return z, z @ t["W_dec"] + t["b_dec"]


def _paper_forward(folder, x):
    """The paper notebook's module: nn.Linear encoder, b_pre, b_latent, linear decoder."""
    sd = torch.load(folder / "sae.pt", weights_only=True)
    k = json.loads((folder / "cfg.json").read_text())["k"]
    pre = (x - sd["b_pre"]) @ sd["W_enc.weight"].t() + sd["b_latent"]
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return z, z @ sd["W_dec.weight"].t() + sd["b_pre"]


@pytest.mark.parametrize("decoder", ["untied", "tied"])
@pytest.mark.parametrize("fmt", ["saelens", "paper"])
def test_export_then_import_round_trip(tmp_path, fmt, decoder):
    sae = _trained_like(decoder)
    x = _raw()
    with torch.no_grad():
        z = sae.encode(x)
        xhat = sae.decode(z)
        out = tmp_path / fmt
        (export_saelens if fmt == "saelens" else export_paper)(sae, out)
        z_file, xhat_file = (_saelens_forward if fmt == "saelens" else _paper_forward)(out, x)
        assert (z > 0).sum(1).max() <= K and (z > 0).sum() > 0.9 * K * len(x)
        torch.testing.assert_close(z_file, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xhat_file, xhat, atol=1e-5, rtol=1e-5)
        back = import_sae(out)
        assert back.cfg.k == K and back.cfg.scale == 1.0
        torch.testing.assert_close(back.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back.decode(back.encode(x)), xhat, atol=1e-5, rtol=1e-5)


def test_saelens_without_b_dec_on_the_input_is_folded(tmp_path):
    sae = _trained_like("untied")
    export_saelens(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    # the same function written the other way SAELens allows: raw x, bias moved into b_enc
    t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    cfg["apply_b_dec_to_input"] = False
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    x = _raw(50)
    with torch.no_grad():
        torch.testing.assert_close(import_sae(tmp_path / "s").encode(x), sae.encode(x),
                                   atol=1e-5, rtol=1e-5)


def test_refuses_what_it_cannot_represent(tmp_path):
    sae = _trained_like("untied")
    export_saelens(sae, tmp_path / "s")
    cfg_file = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value, msg in (("normalize_activations", "expected_average_only_in", "cannot"),
                            ("architecture", "jumprelu", "only TopK")):
        bad = {**cfg, key: value}
        if key == "architecture":
            bad.pop("activation_fn"), bad.pop("activation_fn_str")
        cfg_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            import_sae(tmp_path / "s")
    with pytest.raises(ValueError, match="neither a SAELens folder"):
        import_sae(tmp_path)


def test_encode_decode_any_leading_shape_and_feature_maps():
    sae = _trained_like("untied")
    x = _raw(2 * 3 * 4).reshape(2, 3, 4, D)
    with torch.no_grad():
        z = sae.encode(x)
        assert z.shape == (2, 3, 4, N)
        torch.testing.assert_close(z.reshape(-1, N), sae.encode(x.reshape(-1, D)))
        fmap = x.permute(0, 3, 1, 2)  # [B, C, H, W]
        zmap = sae.encode(fmap, channel_dim=1)
        assert zmap.shape == (2, N, 3, 4)
        torch.testing.assert_close(zmap.permute(0, 2, 3, 1), z)
        torch.testing.assert_close(sae.decode(zmap, channel_dim=1).permute(0, 2, 3, 1),
                                   sae.decode(z))


def test_export_run_sae_reads_the_run_folder(tmp_path):
    sae = _trained_like("untied")
    sae.cfg.layer, sae.cfg.variant = "mixed4c_5x5", "bvlc_googlenet"
    sae.save(tmp_path / "sae" / "mixed4c_5x5")
    out = export_run_sae(tmp_path, "mixed4c_5x5", "saelens")
    assert out == tmp_path / "export" / "mixed4c_5x5-saelens"
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["hook_name"] == "mixed4c_5x5" and cfg["d_sae"] == N
    back = import_sae(out)
    assert back.cfg.layer == "mixed4c_5x5" and back.cfg.variant == "bvlc_googlenet"
    with pytest.raises(FileNotFoundError, match="no trained SAE for mixed4a"):
        export_run_sae(tmp_path, "mixed4a", "paper")


def test_cli_export_and_import(tmp_path):
    from typer.testing import CliRunner

    from branchlens.cli import app

    sae = _trained_like("tied")
    sae.save(tmp_path / "run" / "sae" / "mixed4a")
    runner = CliRunner()
    r = runner.invoke(app, ["export-sae", str(tmp_path / "run"), "--layer", "mixed4a",
                            "--format", "paper", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["out"]
    r = runner.invoke(app, ["import-sae", out, str(tmp_path / "back"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"out": str(tmp_path / "back"), "d_in": D, "n_latents": N,
                                    "k": K, "decoder": "untied"}
    x = _raw(40)
    with torch.no_grad():
        torch.testing.assert_close(TopKSAE.load(tmp_path / "back").encode(x), sae.encode(x),
                                   atol=1e-5, rtol=1e-5)
    r = runner.invoke(app, ["export-sae", str(tmp_path / "run"), "--layer", "mixed4a",
                            "--format", "onnx"])
    assert r.exit_code == 2 and "unknown format 'onnx'" in r.stderr


def test_import_refuses_a_boolean_k_and_non_finite_weights(tmp_path):
    sae = _trained_like("untied")
    export_saelens(sae, tmp_path / "s")
    cfg_file = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"k": True, "activation_fn_kwargs": {"k": True}}))
    with pytest.raises(ValueError, match="no TopK k"):
        import_sae(tmp_path / "s")
    cfg_file.write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    t["W_dec"][3, 2] = float("nan")
    save_file(t, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="non-finite values in W_dec"):
        import_sae(tmp_path / "s")


def test_saelens_topk_with_a_large_k_imports_for_a_known_layer(tmp_path):
    # k = 600 > the layer's width (512): fine for 1024 latents; the layer's slices are kept
    cfg = SAEConfig.for_layer("bvlc_googlenet", "mixed4a", expansion=2, k=600)
    sae = TopKSAE(cfg, seed=0)
    export_saelens(sae, tmp_path / "s")
    back = import_sae(tmp_path / "s", layer="mixed4a", variant="bvlc_googlenet")
    assert back.cfg.k == 600 and back.cfg.n_latents == 1024
    assert back.cfg.branch_slices == cfg.branch_slices
