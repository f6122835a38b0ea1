"""What the visualize, examples and circuits stages share: the run-folder inputs (the SAE
checked against the store, the network with the store's weights, the image source), the
latents to show (a seeded sample, the evidence plan of the analysis) and the schema check of a
direct call. Each stage module (``visualize``, ``examples``, ``circuits``) imports these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from branchlens.artifacts import provenance, write_json
from branchlens.data import ImageSource
from branchlens.run import Run


def load_sae(run_dir: str | Path, layer: str, device: str = "cpu"):
    """The trained SAE of ``RUN/sae/<layer>/`` (see :meth:`branchlens.Run.sae`)."""
    return Run(run_dir, device=device).sae(layer)


def run_source(run_dir: str | Path, source: str | None = None) -> tuple[ImageSource, int | None]:
    """The image source of the run's store (or ``source``): see :meth:`Run.source`."""
    return Run(run_dir).source(source)


def validate_block(block: str, values: dict) -> None:
    """The run schema's checks (types, counts >= 1) for a direct call or CLI command too."""
    from branchlens.config import check_values, fields_of
    from branchlens.settings import BLOCK_CLASSES

    fields = fields_of(BLOCK_CLASSES[block])  # the block's dataclass is the schema
    check_values(block, {k: v for k, v in values.items() if k in fields}, fields)


def store_provenance(run_dir: str | Path) -> dict | None:
    return Run(run_dir).store_provenance()


def check_sae_store(run_dir: str | Path, sae) -> None:
    Run(run_dir).check_sae(sae)


def load_network(variant: str, weights: str | None, device: str,
                 run_dir: str | Path | None = None):
    """The network the run's store was harvested with (see :meth:`Run.model`) and its weights
    info; without a run, the given weights."""
    if run_dir is None:
        from branchlens.devices import resolve_device
        from branchlens.weights import load_model

        return load_model(variant, weights, resolve_device(device))
    model = Run(run_dir, device=device).model(weights, variant)
    return model, model.weights_info


def variant_of(sae) -> str:
    return getattr(sae.cfg, "variant", None) or "bvlc_googlenet"


def pick_latents(sae, n: int, seed: int = 0) -> list[int]:
    """A seeded sample of latents that are not dead (per the SAE's own counter, if any)."""
    n_lat = sae.decoder_directions().shape[0]
    alive = torch.ones(n_lat, dtype=torch.bool)
    if hasattr(sae, "dead_mask"):
        alive = ~sae.dead_mask().cpu()
    pool = alive.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    return sorted(pool[torch.randperm(pool.numel(), generator=gen)[:n]].tolist())


def evidence_plan_of(run_dir: str | Path, layer: str, per_cell: int, pairs: int,
                     cap: int) -> dict:
    """The analysis' evidence latents of ``layer`` (see analysis/evidence.py), cells first,
    then matched-pair latents, at most ``cap``."""
    from branchlens.analysis.evidence import capped, evidence_plan
    from branchlens.analysis.table import read_latent_table
    from branchlens.run import RunError

    run = Run(run_dir)
    if not run.latent_table_path.is_file():
        raise RunError(f"visualize.select=evidence needs the analysis ({run.latent_table_path} "
                       "is missing): run branchlens analyze first")
    rows = read_latent_table(run.latent_table_path, layer)
    plan = evidence_plan({layer: rows}, run.summary(), per_cell, pairs)[layer]
    return capped(plan, layer, per_cell, cap)


def save_evidence(run_dir, layer: str, plan: dict, views: dict, objective: str,
                   index: dict | None = None) -> dict:
    files = {e["latent"]: e["file"] for e in (index or {}).get("latents", [])}
    branch_files = {b: {e["latent"]: e["file"] for e in v["latents"]} for b, v in views.items()}
    doc = {"layer": layer, "objective": objective, "cells": plan["cells"],
           "pairs": plan["pairs"],
           "pictures": {str(j): {"full": files.get(j),
                                 **{b: f[j] for b, f in branch_files.items() if j in f}}
                        for j in plan["latents"]}, **provenance()}
    write_json(Run(run_dir).evidence_path(layer), doc)
    return index or {"layer": layer, "objective": objective, "latents": []}


def dominant_for(run_dir: str | Path, layer: str) -> tuple[np.ndarray, list[str]]:
    """The analysis' dominant branch per latent (−1: none); circuits need the analysis first."""
    return Run(run_dir).dominant(layer)


