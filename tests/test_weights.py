import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from branchlens.model import InceptionV1
from branchlens.weights import WeightsError, load_model, read_state_dict, resolve_weights_path


def _source_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict under the *source's* tensor names (Caffe or Lucid), random values."""
    m = InceptionV1(variant)
    g = torch.Generator().manual_seed(seed)
    ours = m.state_dict()
    sd = {}
    for our_name, theirs in m.variant.weight_names.items():
        module = "classifier" if our_name == "classifier" else f"convs.{our_name}"
        for part in ("weight", "bias"):
            sd[f"{theirs}.{part}"] = torch.randn(ours[f"{module}.{part}"].shape, generator=g)
    return sd


def test_safetensors_round_trip(tmp_path):
    sd = _source_state_dict("bvlc_googlenet")
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    model, info = load_model("bvlc_googlenet", path, verify=False)
    assert torch.equal(model.convs["mixed4c_5x5"].weight, sd["inception_4c/5x5.weight"])
    assert torch.equal(model.classifier.weight, sd["loss3/classifier.weight"])
    assert info.source == "file" and len(info.sha256) == 64 and not info.random


def test_inception5h_pth_round_trip_with_aux_heads(tmp_path):
    sd = _source_state_dict("inception5h")
    assert "mixed4c_5x5_pre_relu_conv.weight" in sd
    assert sd["mixed4a_3x3_pre_relu_conv.weight"].shape == (204, 96, 3, 3)
    assert sd["softmax2_pre_activation_matmul.weight"].shape == (1008, 1024)
    sd["head0_bottleneck_pre_relu_conv.weight"] = torch.zeros(128, 508, 1, 1)  # aux head: ignored
    path = tmp_path / "inception5h.pth"
    torch.save(sd, path)
    model, info = load_model("inception5h", path)
    assert torch.equal(model.convs["mixed4c_pool"].weight,
                       sd["mixed4c_pool_reduce_pre_relu_conv.weight"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1008)


def test_env_var_resolution(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file(_source_state_dict("bvlc_googlenet"), str(path))
    monkeypatch.setenv("BRANCHLENS_BVLC_WEIGHTS", str(path))
    assert resolve_weights_path("bvlc_googlenet") == path


def test_missing_weights_say_how_to_pass_them(tmp_path, monkeypatch):
    monkeypatch.delenv("BRANCHLENS_BVLC_WEIGHTS", raising=False)
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="--weights PATH"):
        resolve_weights_path("bvlc_googlenet")


def test_offline_download_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("BRANCHLENS_INCEPTION5H_WEIGHTS", raising=False)
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlretrieve", offline)
    with pytest.raises(WeightsError, match="--weights"):
        resolve_weights_path("inception5h")
    assert not list(tmp_path.iterdir())  # no partial file left in the cache


def test_wrong_hash_is_refused(tmp_path):
    path = tmp_path / "bvlc_googlenet.safetensors"
    save_file(_source_state_dict("bvlc_googlenet"), str(path))
    with pytest.raises(WeightsError, match="SHA-256"):
        load_model("bvlc_googlenet", path)


def test_truncated_files_are_clear_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_source_state_dict("bvlc_googlenet"), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        read_state_dict(path)
    pth = tmp_path / "w.pth"
    torch.save(_source_state_dict("inception5h"), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="corrupt"):
        read_state_dict(pth)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/branchlens_pwned",))


def test_code_executing_pickle_is_refused(tmp_path):
    target = "/tmp/branchlens_pwned"
    if os.path.exists(target):
        os.unlink(target)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv2d0_pre_relu_conv.weight": _Evil()}, f)
    with pytest.raises(WeightsError, match="refused for safety"):
        load_model("inception5h", path)
    assert not os.path.exists(target)


def test_wrong_shapes_and_missing_keys(tmp_path):
    sd = _source_state_dict("inception5h")
    sd["mixed4a_3x3_pre_relu_conv.weight"] = torch.zeros(208, 96, 3, 3)  # BVLC width
    del sd["mixed5b_pool_reduce_pre_relu_conv.bias"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="1 missing .* 1 with wrong shape"):
        load_model("inception5h", path)


def test_random_weights_warn_and_are_seeded():
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        a, info = load_model("bvlc_googlenet", "random", seed=3)
    with pytest.warns(UserWarning):
        b, _ = load_model("bvlc_googlenet", "random", seed=3)
    assert info.random and info.to_dict()["random"] is True
    assert torch.equal(a.convs["mixed4c_5x5"].weight, b.convs["mixed4c_5x5"].weight)


def test_shared_weights_verify(bvlc_weights):
    model, info = load_model("bvlc_googlenet", bvlc_weights)
    assert info.sha256.startswith("53c37410")
