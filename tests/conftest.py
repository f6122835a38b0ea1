"""Shared fixtures: paths to the read-only shared data, skipped with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BVLC_WEIGHTS = SHARED / "weights" / "bvlc_googlenet.safetensors"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"

os.environ.setdefault("BRANCHLENS_CACHE", str(Path(__file__).parent / ".cache-unused"))


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
