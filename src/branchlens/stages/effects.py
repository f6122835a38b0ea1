"""The effects stage: what latents *do* to the classes, and the animal claim tested causally.

Per layer, on the SAE's held-out images:

- every latent in scope is ablated alone on its own top held-out images; the classes whose
  probability falls most are what it *promotes*, those that rise what it *suppresses*
  (``RUN/effects/latents_<layer>.csv``, shown on the latent's report page);
- the robust 5x5 latents are ablated together and compared with as many robust latents of the
  other branches matched on firing rate and activation mass: the drop in animal probability mass,
  with a bootstrap interval over image groups; the whole 5x5 branch (its channels zeroed) gives
  the scale of the effect, and the latents' share of it (``RUN/effects/<layer>.json``). The
  verdict joins the claims table as ``animals_causal``.

Reads the analysis' latent table (robust labels, firing rates), so it runs after ``analyze``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from branchlens.analysis.claims import animals_causal, attach_claim
from branchlens.analysis.driver import image_groups
from branchlens.analysis.stability import claim_stability
from branchlens.artifacts import atomic_path, provenance, read_json, write_json
from branchlens.data import iter_batches
from branchlens.interventions import (
    ablation_effects,
    branch_slice,
    causal_branch_test,
    clean_probabilities,
    named_classes,
    sparse_codes,
    tail,
)
from branchlens.progress import progress
from branchlens.run import Run
from branchlens.threads import heavy_stage
from branchlens.train.sampling import heldout_images
from branchlens.variants import branch_slices, class_names
from branchlens.weights import sha256_file

SCOPES = ("robust", "all", "none")  # none: the causal test alone
TARGET_BRANCH = "5x5"
EFFECT_COLUMNS = ("latent", "n_images", "promotes", "suppresses", "max_abs_delta_prob")


def heldout_activations(run: Run, layer: str, sae, batch_size: int = 16,
                        show_progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """(activations [N, C, H, W] of the SAE's held-out images, their store indices)."""
    store = run.store()
    held, _ = heldout_images(sae, store)
    source, _ = run.source()
    model = run.model()
    dev = next(model.parameters()).device
    out, got = [], []
    with torch.no_grad(), progress(len(held), f"held-out {layer}", "img",
                                   disable=not show_progress) as bar:
        for batch in iter_batches(source, model.variant, batch_size, 0,
                                  indices=[int(i) for i in held]):
            out.append(model(batch.images.to(dev), [layer])[layer].cpu())
            got += list(batch.indices)
            bar.update(len(batch.indices))
    if not out:
        raise ValueError(f"no held-out images of {layer} could be read")
    return torch.cat(out), np.asarray(got, np.int64)


def top_rows(image_max: torch.Tensor, n_top: int) -> np.ndarray:
    """Top image rows per latent [n, n_top] from the per-image maxima [N, n]; -1 where the
    latent does not fire."""
    mx = image_max.numpy()
    order = np.argsort(-mx, axis=0, kind="stable")[:n_top].T
    fired = np.take_along_axis(mx.T, order, 1) > 0
    return np.where(fired, order, -1)


def layer_effects(run: Run, layer: str, *, scope: str = "robust", n_top: int = 4,
                  n_boot: int = 2000, seed: int = 0, batch_size: int = 32,
                  log: Callable[[str], None] = print, show_progress: bool = True) -> dict:
    t0 = time.time()
    sae = run.sae(layer)
    model = run.model()
    go = tail(model, layer)
    if go is None:
        raise ValueError(f"effects need a block output (mixed4a…); {layer} is a branch output")
    table = run.latents(layer)
    alive = table.column("alive").astype(bool)
    robust = np.array([str(x) for x in table.column("robust_dominant")])
    h, rows = heldout_activations(run, layer, sae.to("cpu"), show_progress=show_progress)
    seconds = {"activations": time.time() - t0}

    # -- what each latent does ---------------------------------------------------------------
    t = time.time()
    codes = sparse_codes(sae, h)
    tops = top_rows(codes.image_max(sae.cfg.n_latents), n_top)
    clean = clean_probabilities(go, h)
    branches = list(branch_slices(model.variant, layer))
    in_scope = alive & (np.isin(robust, branches) if scope == "robust" else scope == "all")
    latents = [int(j) for j in np.flatnonzero(in_scope) if tops[j, 0] >= 0]
    names = class_names(model.variant)
    promotes, suppresses, max_dp = [], [], []
    with progress(len(latents), f"ablations {layer}", "latent",
                  disable=not show_progress or not latents) as bar:
        for s in range(0, len(latents), 256):
            chunk = latents[s:s + 256]
            dp = ablation_effects(go, sae, h, codes, clean,
                                  [[int(i) for i in tops[j] if i >= 0] for j in chunk], chunk,
                                  batch_size)
            p, q = named_classes(dp, names)
            promotes += p
            suppresses += q
            max_dp += dp.abs().amax(1).tolist()
            bar.update(len(chunk))
    seconds["latent_ablations"] = time.time() - t
    eff_rows = [{"latent": j, "n_images": int((tops[j] >= 0).sum()), "promotes": p,
                 "suppresses": q, "max_abs_delta_prob": round(m, 6)}
                for j, p, q, m in zip(latents, promotes, suppresses, max_dp, strict=True)]

    # -- the animal claim, causally -----------------------------------------------------------
    t = time.time()
    others = [b for b in branches if b != TARGET_BRANCH]
    causal = causal_branch_test(
        go, sae, h, image_groups(run.store())[rows], robust, alive,
        table.column("firing_rate").astype(np.float64),
        table.column("mean_activation").astype(np.float64),
        TARGET_BRANCH, others, branch_slice(model.variant, layer, TARGET_BRANCH),
        n_boot=n_boot, seed=seed)
    seconds["causal_test"] = time.time() - t
    return {"layer": layer, "scope": scope, "n_top": n_top, "n_images": int(h.shape[0]),
            "latents_ablated": len(latents), "rows": eff_rows, "causal": causal,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def replicate_stability(run: Run, per_layer: dict[str, dict], *, n_boot: int, seed: int,
                        log: Callable[[str], None], show_progress: bool
                        ) -> tuple[dict, dict] | None:
    """The causal verdict of every replicate SAE that ``branchlens stability`` trained (same
    layers, their own held-out images and robust labels), compared with the main SAEs' verdict
    on those layers as the other claims are; None when there are no replicates."""
    if not run.stability_path.is_file():
        return None
    doc = read_json(run.stability_path)
    layers = [la for la in doc.get("layers") or [] if la in per_layer]
    seeds = (doc.get("seeds") or [])[1:]
    if not layers or not seeds:
        return None
    reps, numbers = [], {}
    for s in seeds:
        rep = Run(run.replicate_dir(int(s)), device=run.device, weights=run.weights)
        if not rep.latent_table_path.is_file():
            log(f"replicate seed {s}: no analysis; left out of the causal claim's stability")
            continue
        got = {la: layer_effects(rep, la, scope="none", n_boot=n_boot, seed=seed, log=log,
                                 show_progress=show_progress)["causal"] for la in layers}
        numbers[f"seed{s}"] = got
        reps.append([animals_causal(got)])
    if not reps:
        return None
    main = [animals_causal({la: per_layer[la] for la in layers})]
    return claim_stability(main, reps, layers)["animals_causal"], numbers


def _sae_sha(run: Run, layer: str) -> str:
    return sha256_file(run.sae_dir(layer) / "weights.safetensors")


def current_causal(run: Run, layers: list[str], log: Callable[[str], None]) -> dict[str, dict]:
    """The causal test of every layer whose effects were computed with its current SAE (a run
    on some layers adds to the others'; a retrained SAE's old effects are left out, said)."""
    out = {}
    for layer in layers:
        path = run.effects_path(layer)
        if not path.is_file():
            continue
        doc = read_json(path)
        if doc.get("sae_sha256") != _sae_sha(run, layer):
            log(f"{layer}: effects were computed with another SAE; left out (run effects on it)")
            continue
        out[layer] = doc["causal"]
    return out


def write_effects_table(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(EFFECT_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue(), encoding="utf-8")


@heavy_stage("effects")
def effects(run_dir: str | Path, layers: list[str] | None = None, *, scope: str = "robust",
            n_top: int = 4, n_boot: int = 2000, seed: int = 0, device: str = "cpu",
            weights: str | None = None, log: Callable[[str], None] = print,
            show_progress: bool = True) -> dict:
    """Run the stage on ``layers`` (default: every analysed layer); returns the causal claim."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    if n_top < 1:
        raise ValueError(f"--top-images must be ≥ 1, got {n_top}")
    run = Run(run_dir, device=device, weights=weights)
    if not run.summary_path.is_file():
        raise FileNotFoundError(f"no analysis in {run.path}: run branchlens analyze first")
    summary = read_json(run.summary_path)
    analysed = list(summary.get("layers") or [])
    layers = layers or analysed
    missing = [la for la in layers if la not in analysed]
    if missing:
        raise ValueError(f"layer(s) {missing} not analysed; analysed: {', '.join(analysed)}")
    for layer in layers:
        res = layer_effects(run, layer, scope=scope, n_top=n_top, n_boot=n_boot, seed=seed,
                            log=log, show_progress=show_progress)
        run.effects_dir.mkdir(parents=True, exist_ok=True)
        rows = res.pop("rows")
        if scope != "none":  # --scope none keeps the labels an earlier run wrote
            write_effects_table(run.effects_table_path(layer), rows)
        write_json(run.effects_path(layer), {**res, **provenance(sae_sha256=_sae_sha(run, layer))})
        c = res["causal"]
        log(f"{layer}: " + (f"ablated {res['latents_ablated']} latents on ≤ {n_top} top images "
                            "each; " if scope != "none" else "")
            + (f"animal-mass drop {TARGET_BRANCH} {c['drop_target']:+.4f} vs matched "
               f"{c['drop_matched']:+.4f} (Δ 95% CI [{c['difference']['ci_low']:+.4f}, "
               f"{c['difference']['ci_high']:+.4f}])" if c["testable"] else
               f"causal test not testable: {c['why']}")
            + f" [{sum(res['seconds'].values()):.0f} s]")
    per_layer = current_causal(run, analysed, log)
    claim = animals_causal(per_layer)
    stab = replicate_stability(run, per_layer, n_boot=n_boot, seed=seed, log=log,
                               show_progress=show_progress)
    if stab is not None:
        claim["stability"], claim["numbers"]["replicates"] = stab
    summary = read_json(run.summary_path)
    summary["claims"] = attach_claim(summary.get("claims") or [], claim, after="animals")
    write_json(run.summary_path, summary)
    return claim
