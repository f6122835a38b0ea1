"""Shared fixtures: paths to the read-only shared data, skipped with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BVLC_WEIGHTS = SHARED / "weights" / "bvlc_googlenet.safetensors"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"

os.environ.setdefault("BRANCHLENS_CACHE", str(Path(__file__).parent / ".cache-unused"))


def pytest_terminal_summary(terminalreporter) -> None:
    """The browser the Chromium tests drove, printed under every run (``-q`` too), so that a
    browser failure names the browser and Playwright it ran against."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _browser import browser_version

    terminalreporter.write_line(f"browser: {browser_version()}")


@pytest.fixture(scope="session")
def bvlc_weights() -> Path:
    if not BVLC_WEIGHTS.is_file():
        pytest.skip(f"shared BVLC weights not found at {BVLC_WEIGHTS} (only in dev/CI)")
    return BVLC_WEIGHTS


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {IMAGENET_SAMPLE} (only in dev/CI)")
    return IMAGENET_SAMPLE


@pytest.fixture(scope="session")
def bvlc_model(bvlc_weights):
    from branchlens.weights import load_model

    model, _ = load_model("bvlc_googlenet", bvlc_weights)
    return model


# One tiny end-to-end run (every stage, through the CLI, random weights on 6 embedded photos),
# shared by the tests that read a finished run instead of each running its own pipeline.
E2E_SETS = {
    "harvest": {"layers": ["mixed4a", "mixed4b"], "sampling": "uniform",
                "samples_per_image": 20, "batch_size": 4},
    "sae": {"expansion": 1},
    "train": {"batch_size": 64, "steps": 4, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2,
              "progress": False},
    "analyze": {"n_perm": 50, "curve_reps": 20, "embed": "pca"},
    "visualize": {"n_latents": 2, "steps": 2, "size": 64, "select": "random"},
    "examples": {"n_strips": 2, "n_top": 2},
    "circuits": {"n_latents": 1, "n_images": 2, "flow_latents": 4, "n_perm": 20, "ablate": 1},
    "report": {"cards_per_layer": 4},
}


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """(run folder, CLI result) of ``branchlens run embedded:6 --weights random`` (all stages)."""
    import json
    import warnings

    from typer.testing import CliRunner

    from branchlens.cli import app

    out = tmp_path_factory.mktemp("e2e") / "run"
    args = ["run", "embedded:6", "--out", str(out), "--weights", "random", "--device", "cpu"]
    for stage, kv in E2E_SETS.items():
        for k, v in kv.items():
            args += ["--set", f"{stage}.{k}={json.dumps(v)}"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "RANDOM WEIGHTS")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result
