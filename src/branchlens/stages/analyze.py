"""The analyze stage: every statistic for every trained layer of a run, into ``RUN/analysis/``.

Reads the store (``RUN/store``) and the SAEs (``RUN/sae/<layer>``), checks that each SAE is
finished and was trained on this store, runs :func:`branchlens.analysis.driver.analyze_layer` on
the SAE's held-out images, matches adjacent layers, and writes ``summary.json`` (claims first),
``latents.csv`` and ``layers.csv``. The statistics themselves live in :mod:`branchlens.analysis`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from branchlens.analysis.claims import paper_claims
from branchlens.analysis.driver import (
    PVALUE_NOTE,
    AnalysisConfig,
    AnalysisError,
    analyze_layer,
    cross_layer,
    image_groups,
)
from branchlens.analysis.stats import bh_reject
from branchlens.analysis.table import write_latent_table
from branchlens.artifacts import provenance, write_json
from branchlens.run import Run, RunError, layer_order
from branchlens.threads import heavy_stage
from branchlens.train.sampling import heldout_images


def find_layers(run_dir: Path) -> list[str]:
    """Layers with a trained SAE under ``RUN/sae``, in forward order."""
    return Run(run_dir).layers


# -- inputs ---------------------------------------------------------------------------------------

def load_layer_sae(run_dir: Path, layer: str, store, device: str = "cpu"):
    """The trained SAE of ``layer``, checked: present, finished, trained on this store."""
    from branchlens.sae import TopKSAE

    where = Run(run_dir).sae_dir(layer)
    if not (where / "weights.safetensors").is_file():
        raise AnalysisError(f"{layer}: no trained SAE in {where}; run "
                            f"`branchlens train {run_dir} --layers {layer}` first")
    try:
        sae = TopKSAE.load(where, device=device)
    except Exception as e:
        raise AnalysisError(f"{layer}: cannot read the SAE in {where} ({type(e).__name__}: "
                            f"{e}); re-run `branchlens train {run_dir} --layers {layer}`") from e
    meta = getattr(sae, "meta", {}) or {}
    tr = meta.get("train") or {}
    if tr and (tr.get("step", 0) < tr.get("total_steps", 0) or "eval" not in meta):
        raise AnalysisError(f"{layer}: the SAE is half-trained (step {tr.get('step')} of "
                            f"{tr.get('total_steps')}); finish it with `branchlens train "
                            f"{run_dir} --layers {layer}`")
    want = meta.get("store_hash")
    if want and want != store.content_hash():
        raise AnalysisError(f"{layer}: the SAE was trained on another store (hash "
                            f"{want[:12]}…, this store {store.content_hash()[:12]}…); "
                            f"re-train it with `branchlens train {run_dir} --layers {layer}`")
    if layer not in store.layers:
        raise AnalysisError(f"{layer}: not in the store (it has {store.layers}); re-run harvest")
    sae.eval()
    return sae


@heavy_stage("analyze")
def analyze(run_dir: str | Path, *, layers: list[str] | None = None, store=None,
            config: AnalysisConfig | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Analyse every trained layer of a run; writes ``RUN/analysis/`` and returns the summary.

    ``store`` may be given (any object with the store API); else ``RUN/store``.
    """
    run_dir = Path(run_dir)
    cfg = config or AnalysisConfig()
    from branchlens.devices import resolve_device

    try:  # before any work: a missing GPU must not read as a broken SAE
        cfg.device = str(resolve_device(cfg.device))
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    log = log or (lambda s: None)
    run = Run(run_dir)
    if store is None:
        try:
            store = run.store(verify=True)
        except RunError as e:
            raise AnalysisError(str(e)) from e
    layers = layers or run.layers
    if not layers:
        raise AnalysisError(f"no trained SAEs under {run.sae_root}; run "
                            f"`branchlens train {run_dir}` first")
    layers = sorted(layers, key=layer_order)
    saes = {layer: load_layer_sae(run_dir, layer, store, cfg.device) for layer in layers}
    out_dir = run.analysis_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    groups = image_groups(store)
    t0 = time.time()
    res = {}
    for layer in layers:
        held, note = heldout_images(saes[layer], store)
        res[layer] = analyze_layer(layer, saes[layer], store, cfg, out_dir, log, held, note,
                                   groups)
    pairs = list(zip(layers[:-1], layers[1:], strict=False))
    if len(layers) > 2:
        pairs.append((layers[0], layers[-1]))
    tc = time.time()
    cross = [cross_layer(a, b, res, saes, store, cfg, groups, log)
             | {"adjacent": k < len(layers) - 1} for k, (a, b) in enumerate(pairs)]
    t_cross = time.time() - tc
    correct_categories(res, layers)
    rows = [r for layer in layers for r in res[layer]["rows"]]
    table = [{"layer": t.pop("layer"), **t} for layer in layers for t in res[layer]["table"]]
    tw = time.time()
    write_latent_table(run.latent_table_path, rows)
    write_latent_table(run.layer_table_path, table)  # same CSV conventions
    t_write = time.time() - tw
    per_layer = {layer: res[layer]["summary"] for layer in layers}
    steps: dict[str, float] = {}
    for layer in layers:
        for k, v in per_layer[layer]["seconds_steps"].items():
            steps[k] = round(steps.get(k, 0.0) + v, 1)
    summary = {
        "claims": paper_claims(per_layer, cross, q=cfg.q),
        "run_dir": str(run_dir), "config": asdict(cfg), "layers": layers,
        "per_layer": per_layer, "cross_layer": cross, "pvalue_note": PVALUE_NOTE,
        "seconds": {"total": round(time.time() - t0, 1), "cross_layer": round(t_cross, 1),
                    "writing_tables": round(t_write, 1), "per_step_over_layers": steps},
        "provenance": provenance(store_manifest_variant=store.manifest.get("variant")),
    }
    write_json(run.summary_path, summary)
    run.stability_path.unlink(missing_ok=True)  # it judged the previous analysis
    log("analysis: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
        + f", cross-layer {t_cross:.1f} s, tables {t_write:.1f} s; total "
        f"{summary['seconds']['total']:.1f} s")
    return summary


def correct_categories(res: dict, layers: list[str]) -> None:
    """BH across every layer × branch of the category test (dominant and robust-dominant)."""
    for key in ("dominant", "robust_dominant"):
        cells = [(layer, b) for layer in layers
                 for b, r in res[layer]["summary"]["category_test"][key].items()
                 if r.get("p_value") is not None]
        if not cells:
            continue
        p = np.array([[res[layer]["summary"]["category_test"][key][b]["p_value"]]
                      for layer, b in cells])
        rej, qv = bh_reject(p, 0.05)
        for (layer, b), r, qq in zip(cells, rej[:, 0], qv[:, 0], strict=True):
            cell = res[layer]["summary"]["category_test"][key][b]
            cell["q_value_layers_x_branches"] = float(qq)
            cell["significant"] = bool(r)
