"""SAELens / paper export and import: same codes and reconstructions on raw activations."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

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


class _TiedTranspose(nn.Module):
    """The notebook's tied decoder: it holds the encoder's ``nn.Linear`` and applies its
    transpose, so its state dict repeats the encoder weight as ``W_dec.linear.weight``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, z):
        return F.linear(z, self.linear.weight.t())


class NotebookSAE(nn.Module):
    """The paper notebook's SAE class, re-created from its description: an ``nn.Linear``
    encoder without bias, the tied-transpose decoder, ``b_pre`` and ``b_latent``, TopK then
    ReLU; ``x̂ = W_dec(z) + b_pre``."""

    def __init__(self, d: int, n: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Linear(d, n, bias=False)
        self.W_dec = _TiedTranspose(self.W_enc)
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.b_latent = nn.Parameter(torch.zeros(n))

    def encode(self, x):
        pre = self.W_enc(x - self.b_pre) + self.b_latent
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def forward(self, x):
        z = self.encode(x)
        return self.W_dec(z) + self.b_pre, z


def _notebook(folder):
    """The exported file loaded the notebook's way: strictly, into its own class."""
    k = json.loads((folder / "cfg.json").read_text())["k"]
    nb = NotebookSAE(D, N, k)
    nb.load_state_dict(torch.load(folder / "sae.pt", weights_only=True))  # strict=True
    return nb


@pytest.mark.parametrize("decoder", ["untied", "tied"])
def test_saelens_export_gives_the_same_codes_and_round_trips(tmp_path, decoder):
    sae, x = _trained_like(decoder), _raw()
    with torch.no_grad():
        z = sae.encode(x)
        xhat = sae.decode(z)
        out = export_saelens(sae, tmp_path / "s")
        z_file, xhat_file = _saelens_forward(out, x)
        assert (z > 0).sum(1).max() <= K and (z > 0).sum() > 0.9 * K * len(x)
        torch.testing.assert_close(z_file, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xhat_file, xhat, atol=1e-5, rtol=1e-5)
        back = import_sae(out)
        assert back.cfg.k == K and back.cfg.scale == 1.0
        torch.testing.assert_close(back.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back.decode(back.encode(x)), xhat, atol=1e-5, rtol=1e-5)


def test_paper_export_loads_strictly_in_the_notebook_class_and_reconstructs_exactly(tmp_path):
    """Tied SAEs: the notebook picks the same latents, its codes are branchlens's codes / s
    (s = the input scale, recorded as ``input_scale``) and its reconstructions are the same."""
    sae, x = _trained_like("tied"), _raw()
    s = sae.cfg.scale
    out = export_paper(sae, tmp_path / "paper")
    sd = torch.load(out / "sae.pt", weights_only=True)
    assert sorted(sd) == sorted(NotebookSAE(D, N, K).state_dict())
    assert sd["W_dec.linear.weight"].shape == (N, D)
    assert json.loads((out / "cfg.json").read_text())["input_scale"] == pytest.approx(s)
    nb = _notebook(out)
    with torch.no_grad():
        z = sae.encode(x)
        xhat = sae.decode(z)
        xhat_nb, z_nb = nb(x)
        assert torch.equal(z_nb > 0, z > 0) and (z > 0).sum() > 0.9 * K * len(x)
        torch.testing.assert_close(z_nb, z / s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xhat_nb, xhat, atol=1e-4, rtol=1e-5)
        assert xhat.abs().max() > 1  # the comparisons are of real values, not of zeros
        back = import_sae(out)  # the folder restores the scale: branchlens's own codes
        assert back.cfg.decoder == "tied" and back.cfg.scale == pytest.approx(s)
        torch.testing.assert_close(back.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back.decode(back.encode(x)), xhat, atol=1e-4, rtol=1e-5)
        (tmp_path / "bare.pt").write_bytes((out / "sae.pt").read_bytes())
        bare = import_sae(tmp_path / "bare.pt", k=K)  # the state dict alone: the notebook's
        assert bare.cfg.scale == 1.0
        torch.testing.assert_close(bare.encode(x), z_nb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bare.decode(bare.encode(x)), xhat, atol=1e-4, rtol=1e-5)


def test_paper_export_refuses_an_untied_sae_and_names_the_alternative(tmp_path):
    with pytest.raises(ValueError, match=r"untied decoder.*--format saelens") as e:
        export_paper(_trained_like("untied"), tmp_path / "paper")
    assert "\n" not in str(e.value) and not (tmp_path / "paper").exists()


# -- SAELens 6 ----------------------------------------------------------------------------------

# SAELens 6's TopKSAEConfig fields in its declaration order, with their defaults.
_SAELENS6_TOPK_FIELDS = {"d_in": None, "d_sae": None, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "reshape_activations": "none", "metadata": None, "k": 100,
                         "rescale_acts_by_decoder_norm": False}


def _saelens6_version(cfg) -> tuple[int, ...] | None:
    """The version SAELens 6 reads (top level, else ``metadata``); below 6 (or none) it
    rebuilds ``metadata`` from language-model keys instead of keeping it."""
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    return tuple(int(p) for p in v.split("-")[0].split(".")) if v else None


def _saelens6_write(folder, cfg, tensors):
    """A folder as SAELens 6's ``save_model`` writes it: ``json.dump(cfg.to_dict())`` (the
    config dataclass's own fields only, ``metadata`` as a dict, then ``architecture``) and
    ``safetensors.torch.save_file(state_dict)`` with no metadata."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    doc = {f: cfg.get(f, default) for f, default in _SAELENS6_TOPK_FIELDS.items()}
    doc["architecture"] = "topk"
    save_file({k: tensors[k].contiguous() for k in ("W_dec", "W_enc", "b_dec", "b_enc")},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(doc))
    return folder


def test_saelens_export_keeps_its_metadata_through_saelens_6(tmp_path):
    """Exported, loaded and saved again by SAELens 6 (written here as it writes), imported:
    same codes, and the layer, variant and branch slices come back from ``metadata``."""
    cfg = SAEConfig.for_layer("bvlc_googlenet", "mixed4c_5x5", expansion=2, k=K)
    sae = TopKSAE(cfg, seed=3)
    sae.init_from_sample(torch.randn(100, 64) * 5 + 2)
    export_saelens(sae, tmp_path / "ours")
    doc = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert _saelens6_version(doc) >= (6, 0, 0)  # so SAELens keeps the block as written
    resaved = _saelens6_write(tmp_path / "resaved", doc,
                              load_file(str(tmp_path / "ours" / "sae_weights.safetensors")))
    written = json.loads((resaved / "cfg.json").read_text())
    assert "hook_name" not in written and written["metadata"]["branchlens"]["layer"]
    back = import_sae(resaved)
    assert (back.cfg.layer, back.cfg.variant) == ("mixed4c_5x5", "bvlc_googlenet")
    assert back.cfg.branch_slices == {"5x5": [0, 64]}
    x = torch.randn(50, 64) * 5 + 2
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)


def _foreign_tensors(d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.zeros(n),
            "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.zeros(d)}


def test_saelens_import_recovers_the_layer_from_hook_name_or_asks_for_layer(tmp_path):
    """An SAE trained in SAELens on branchlens activations: no branchlens block, the layer is
    ``metadata.hook_name`` and the variant ``model_name``; a hook that is no layer is refused
    with a request for --layer, which then imports it."""
    from typer.testing import CliRunner

    from branchlens.cli import app

    meta = {"sae_lens_version": "6.5.0", "sae_lens_training_version": "6.5.0",
            "model_name": "bvlc_googlenet", "hook_name": "mixed4c", "hook_head_index": None,
            "context_size": 196, "prepend_bos": False, "dataset_path": "imagenet"}
    t = _foreign_tensors(512, 512)
    good = _saelens6_write(tmp_path / "good", {"d_in": 512, "d_sae": 512, "k": 8,
                                               "metadata": meta}, t)
    sae = import_sae(good)
    assert (sae.cfg.layer, sae.cfg.variant, sae.cfg.k) == ("mixed4c", "bvlc_googlenet", 8)
    assert sae.cfg.branch_slices == SAEConfig.for_layer("bvlc_googlenet", "mixed4c").branch_slices
    old = tmp_path / "pre6"  # SAELens 5 files: the same keys at the top level, no metadata
    _saelens6_write(old, {"d_in": 512, "d_sae": 512, "k": 8}, t)
    doc = json.loads((old / "cfg.json").read_text())
    (old / "cfg.json").write_text(json.dumps({**doc, "metadata": None, "hook_name": "mixed4c",
                                              "model_name": "bvlc_googlenet"}))
    assert import_sae(old).cfg.layer == "mixed4c"
    for name, hook, model, d, msg in (
            ("llm", "blocks.3.hook_resid_post", "gpt2", 512, "model 'gpt2' is not a variant"),
            ("nohook", None, None, 512, "names no layer"),
            ("narrow", "mixed4c", "bvlc_googlenet", 24, "has 512 channels but the SAE reads 24"),
            ("nolayer", "mixed9z", "bvlc_googlenet", 512, "'mixed9z' is not a layer")):
        folder = _saelens6_write(tmp_path / name, {
            "d_in": d, "d_sae": 512, "k": 8,
            "metadata": {**meta, "hook_name": hook, "model_name": model}},
            _foreign_tensors(d, 512))
        with pytest.raises(ValueError, match=msg) as e:
            import_sae(folder)
        assert "--layer" in str(e.value) and "\n" not in str(e.value)
    runner = CliRunner()
    r = runner.invoke(app, ["import-sae", str(tmp_path / "llm"), str(tmp_path / "out")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--layer" in r.stderr and not (tmp_path / "out").exists()
    r = runner.invoke(app, ["import-sae", str(tmp_path / "llm"), str(tmp_path / "out"),
                            "--layer", "mixed4c", "--json"])
    assert r.exit_code == 0, r.output
    assert TopKSAE.load(tmp_path / "out").cfg.branch_slices["5x5"] == [384, 448]


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
                                    "k": K, "decoder": "tied"}
    x = _raw(40)
    with torch.no_grad():
        torch.testing.assert_close(TopKSAE.load(tmp_path / "back").encode(x), sae.encode(x),
                                   atol=1e-5, rtol=1e-5)
    r = runner.invoke(app, ["export-sae", str(tmp_path / "run"), "--layer", "mixed4a",
                            "--format", "onnx"])
    assert r.exit_code == 2 and "unknown format 'onnx'" in r.stderr
    _trained_like("untied").save(tmp_path / "run" / "sae" / "mixed4b")
    r = runner.invoke(app, ["export-sae", str(tmp_path / "run"), "--layer", "mixed4b",
                            "--format", "paper"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "untied decoder" in r.stderr and "--format saelens" in r.stderr


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
