"""The presets of ``branchlens run``: data over the block dataclasses of
:mod:`branchlens.settings`.

A preset names only what differs from the blocks' defaults (``branchlens presets NAME`` prints
one as a config file); :func:`check_preset` checks one against the dataclasses (unknown keys,
types, ranges), and :func:`branchlens.pipeline.make_config` validates the merged config as a
whole before a run. ``branchlens.pipeline.PRESETS`` re-exports these.
"""

from __future__ import annotations

from typing import Any

from branchlens.settings import MIXED4, check_config_keys

__all__ = ["PRESETS", "PRESET_NOTES", "check_preset"]

PRESETS: dict[str, dict[str, Any]] = {
    # Finishes in well under 10 minutes on a 2-core CPU: the embedded photos as 192 views,
    # every position, small SAEs, few steps, a handful of visualised latents.
    "demo": {
        "source": "embedded:192",
        "variant": "bvlc_googlenet",
        "seed": 0,
        "harvest": {"layers": list(MIXED4), "sampling": "all", "samples_per_image": 10,
                    "aligned": True, "dtype": "fp16", "batch_size": 16},
        "sae": {"expansion": 4, "k": 32, "decoder": "untied"},
        "train": {"batch_size": 1024, "steps": 300, "lr": 1e-3, "warmup_steps": 20,
                  "log_every": 25, "ckpt_every": 100},
        # PCA: UMAP's first use compiles for ~40 s, a seventh of the demo's analysis
        "analyze": {"n_perm": 500, "curve_reps": 100, "bootstrap": 500, "embed": "pca"},
        # the pictures of the latents the claims rest on: per layer the best robust latent of
        # (at most) two branches, each also restricted to its branch (4 renders per layer)
        "visualize": {"select": "evidence", "n_latents": 2, "per_cell": 1, "pairs": 1,
                      "steps": 80, "size": 112, "batch_size": 8},
        "examples": {"n_top": 12, "n_strips": 12, "batch_size": 16, "select": "evidence",
                     "per_cell": 1, "pairs": 1},
        "circuits": {"n_latents": 3, "n_images": 4, "flow_latents": 32, "n_perm": 500,
                     "ablate": 2, "batch_size": 16},
        "report": {"cards_per_layer": 12},
    },
    # The paper's expansion on real images, finished by a 2-core CPU in under an hour: a folder
    # of ImageNet images (the shared 1000-image sample) plus mirrors, every position, 16× SAEs
    # (k=32) trained on ≈2 M vectors per layer (5.6 passes over the 2 × 900 training images).
    "sample16x": {
        "source": None,
        "variant": "bvlc_googlenet",
        "seed": 0,
        "stages": ["harvest", "train", "analyze", "visualize", "examples", "report"],
        "harvest": {"layers": list(MIXED4), "sampling": "all", "samples_per_image": 10,
                    "aligned": True, "dtype": "fp16", "batch_size": 32, "flip": True},
        "sae": {"expansion": 16, "k": 32, "decoder": "untied"},
        "train": {"batch_size": 4096, "steps": 480, "lr": 1e-3, "warmup_steps": 50,
                  "log_every": 25, "ckpt_every": 100, "eval_max_vectors": 50000},
        # PCA: UMAP of 8–13k latents costs ~1.5 min per layer on 2 cores (`--set
        # analyze.embed="umap"` to have it anyway).
        "analyze": {"embed": "pca"},
        "visualize": {"select": "evidence", "n_latents": 10, "per_cell": 2, "pairs": 2,
                      "steps": 128, "size": 128, "batch_size": 16},
        "examples": {"n_top": 12, "n_strips": 16, "batch_size": 32, "select": "evidence",
                     "per_cell": 2, "pairs": 2},
        "circuits": {"n_latents": 3, "n_images": 4, "flow_latents": 32, "n_perm": 500,
                     "ablate": 2, "batch_size": 16},
        "report": {"cards_per_layer": 24},
    },
    # The paper's settings (Bozoukov 2025) on the model it used, with corrected preprocessing;
    # add --paper-compat for its [0, 1] input bug. Meant for ImageNet train on a GPU machine.
    "paper": {
        "source": None,
        "variant": "inception5h",
        "seed": 0,
        "harvest": {"layers": list(MIXED4), "sampling": "norm", "samples_per_image": 10,
                    "aligned": False, "dtype": "fp16", "batch_size": 128},
        "sae": {"expansion": 16, "k": 32, "decoder": "tied", "loss": "paper",
                "b_pre_init": "zeros", "aux": False},
        "train": {"batch_size": 4096, "epochs": 100, "lr": 1e-3, "warmup_steps": 0,
                  "decay": "none"},
        "analyze": {},
        "visualize": {"select": "evidence", "n_latents": 64, "per_cell": 8, "pairs": 8,
                      "steps": 512, "size": 224, "batch_size": 16},
        "examples": {"n_top": 16, "n_strips": 64, "batch_size": 64, "select": "evidence",
                     "per_cell": 8, "pairs": 8},
        "circuits": {"n_latents": 8, "n_images": 8, "flow_latents": 256, "n_perm": 1000,
                     "ablate": 4, "batch_size": 32},
        "report": {"cards_per_layer": 48},
    },
}

PRESET_NOTES: dict[str, str] = {
    "demo": "embedded photos, small SAEs, every stage; minutes on a 2-core CPU",
    "sample16x": "an ImageNet folder plus mirrors, 16x SAEs (k=32); about an hour on 2 cores",
    "paper": "the paper's SAE settings on inception5h; ImageNet train on a GPU machine",
}


def check_preset(name: str, preset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a preset (default: the one called ``name``) against the block dataclasses and the
    top-level keys; returns it, or raises :class:`~branchlens.config.ConfigError`."""
    preset = PRESETS[name] if preset is None else preset
    check_config_keys(preset, where=f"preset {name!r}: ")
    return preset
