"""The stability stage (``branchlens stability RUN``): replicate SAEs of other seeds, and
what survives them.

The run's own SAEs are replicate 0. Each further replicate trains the same SAE settings on the
same store with training seed ``seed + k`` (other initialisation, batch order and held-out
images) into ``RUN/replicates/seed<s>/``, a run folder of its own whose ``store`` links to the
run's, so training and analysis are the ordinary stages. Then, on the chosen layers:
per claim, the verdict of every replicate decided on those layers only; per latent, its best
decoder-cosine match in every replicate and whether its label replicates; near-duplicate
latents. Written to ``RUN/analysis/stability.json`` and as a ``stability`` entry of every claim
in ``summary.json``. Resumable: finished replicate SAEs and analyses are reused.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.analysis import stability as st
from branchlens.analysis.claims import paper_claims
from branchlens.artifacts import provenance, read_json, write_json
from branchlens.run import Run, RunError, layer_order

MIN_REPLICATES = 2  # the run's own SAEs and at least one more


class StabilityError(ValueError):
    """The run cannot be checked for stability as it is; the message says what to run."""


def _train_settings(sae) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """SAE keyword arguments, expansion and training config the run's SAE was made with."""
    cfg = sae.cfg
    kw = {k: getattr(cfg, k) for k in ("k", "decoder", "aux", "k_aux", "aux_coef",
                                        "dead_after", "loss", "b_pre_init")}
    tcfg = ((getattr(sae, "meta", {}) or {}).get("train") or {}).get("config")
    if not tcfg:
        raise StabilityError(f"{cfg.layer}: the SAE records no training config; re-train it "
                             "with this version of branchlens")
    return kw, cfg.n_latents // cfg.d_in, tcfg


def _subset_claims(summary: dict, layers: list[str]) -> list[dict]:
    """The claims decided on ``layers`` only, from a summary (as a replicate would be)."""
    per = {la: summary["per_layer"][la] for la in layers}
    pairs = list(zip(layers[:-1], layers[1:], strict=False))
    if len(layers) > 2:
        pairs.append((layers[0], layers[-1]))
    by_key = {tuple(c["layers"]): c for c in summary.get("cross_layer", [])}
    cross = [by_key[p] | {"adjacent": k < len(layers) - 1}
             for k, p in enumerate(pairs) if p in by_key]
    return paper_claims(per, cross, q=float(summary["config"]["q"]))


def _link_store(run: Run, rep: Path) -> None:
    rep.mkdir(parents=True, exist_ok=True)
    link = Run(rep).store_dir
    if not link.exists():
        os.symlink(os.path.relpath(run.store_dir, rep), link)


def stability(run_dir: str | Path, layers: list[str] | None = None, replicates: int = 3,
              device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Train ``replicates − 1`` more SAEs per layer, analyse them, compare; returns the result."""
    from branchlens.analysis.driver import AnalysisConfig
    from branchlens.stages.analyze import analyze
    from branchlens.stages.train import train_layers
    from branchlens.train import TrainConfig

    run = Run(run_dir)
    if replicates < MIN_REPLICATES:
        raise StabilityError(f"need --replicates >= {MIN_REPLICATES} (the run's own SAEs are "
                             f"one), got {replicates}")
    try:
        summary = run.summary()
    except RunError as e:
        raise StabilityError(str(e)) from e
    layers = sorted(layers or summary["layers"], key=layer_order)
    missing = [la for la in layers if la not in summary["per_layer"]]
    if missing:
        raise StabilityError(f"layers {missing} are not analysed in {run.summary_path} "
                             f"(analysed: {summary['layers']}); run `branchlens analyze` first")
    t0 = time.time()
    saes = {la: run.sae(la) for la in layers}
    seed0 = int(_train_settings(saes[layers[0]])[2].get("seed", 0))
    seeds = [seed0 + k for k in range(1, replicates)]
    acfg = AnalysisConfig(**{k: v for k, v in summary["config"].items()
                             if k in {f.name for f in dataclasses.fields(AnalysisConfig)}})
    acfg.device = device
    rep_claims, rep_runs = [], []
    for s in seeds:
        rep = run.replicate_dir(s)
        _link_store(run, rep)
        for la in layers:
            kw, expansion, tcfg = _train_settings(saes[la])
            cfg = TrainConfig(**{**tcfg, "seed": s, "progress": False, "device": device})
            log(f"[stability] seed {s}: train {la}")
            train_layers(rep, [la], kw, cfg, expansion=expansion, log=log)
        rr = Run(rep)
        have = rr.summary() if rr.summary_path.is_file() else None
        if have is None or sorted(have.get("layers", []), key=layer_order) != layers:
            log(f"[stability] seed {s}: analyze {', '.join(layers)}")
            have = analyze(rep, layers=layers, config=dataclasses.replace(acfg), log=log)
        rep_claims.append(have["claims"])
        rep_runs.append(rr)
    main_claims = _subset_claims(summary, layers)
    claims = st.claim_stability(main_claims, rep_claims, layers)
    per_layer = {}
    for la in layers:
        labels, branches = run.dominant(la)
        alive = run.latents(la).column("alive").astype(bool)
        dec = saes[la].decoder_directions().float().cpu().numpy()
        rows = {"near_duplicates": st.near_duplicates(dec), "latents": int(dec.shape[0]),
                "replicates": {}}
        same_all = np.ones(labels.size, bool)
        for s, rr in zip(seeds, rep_runs, strict=True):
            other, _ = rr.dominant(la)
            odec = rr.sae(la).decoder_directions().float().cpu().numpy()
            match, cos = st.best_matches(dec, odec)
            rows["replicates"][f"seed{s}"] = st.label_replication(labels, other, match, cos,
                                                                  branches, alive)
            rows["replicates"][f"seed{s}"]["near_duplicates"] = st.near_duplicates(odec)
            same_all &= (cos >= st.MATCH_COS) & (other[match] == labels)
        lab = alive & (labels >= 0)
        rows["labelled_in_every_replicate"] = {
            "latents": int(lab.sum()), "same_label_everywhere": int((same_all & lab).sum())}
        rows["label_replicates"] = (same_all & lab).tolist()  # per latent, for the report
        per_layer[la] = rows
    out = {"layers": layers, "replicates": replicates, "seeds": [seed0, *seeds],
           "match_cos": st.MATCH_COS, "duplicate_cos": st.DUPLICATE_COS,
           "claims": claims, "per_layer": per_layer,
           "seconds": round(time.time() - t0, 1), "provenance": provenance()}
    write_json(run.stability_path, out)
    summary = read_json(run.summary_path)  # attach to the claims the report shows
    for c in summary.get("claims", []):
        if c["id"] in claims:
            c["stability"] = claims[c["id"]]
    summary["stability"] = {k: out[k] for k in ("layers", "replicates", "seeds", "seconds")}
    write_json(run.summary_path, summary)
    return out


def format_stability(res: dict) -> str:
    """Plain-text summary for the CLI."""
    lines = [f"stability over {res['replicates']} SAE seeds {res['seeds']} on "
             f"{', '.join(res['layers'])}:"]
    for cid, c in res["claims"].items():
        lines.append(f"  {cid}: {c['summary']} ({' / '.join(c['verdicts'])})")
    for la, r in res["per_layer"].items():
        for name, rep in r["replicates"].items():
            lab = rep["labelled"]
            frac = lab["same_label_fraction"]
            lines.append(f"  {la} vs {name}: {rep['matched']}/{rep['latents']} latents matched "
                         f"(cos ≥ {rep['threshold']}), labelled latents keeping their label "
                         f"{lab['same_label']}/{lab['matched']}"
                         + (f" ({frac:.2f})" if frac is not None else "")
                         + f"; near-duplicates {r['near_duplicates']} / {rep['near_duplicates']}")
    return "\n".join(lines)
