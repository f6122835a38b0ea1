"""``branchlens run``: harvest → train → analyze → visualize/examples/circuits → report.

Each stage reads the previous stage's artifacts in the run directory and resumes on its own when
killed. ``RUN/run.json`` records the config, versions, seed, and for every stage its status,
config hash, timing, the digest of each of its outputs and of the upstream outputs it read. A
stage is skipped only when it is ``done`` under the same config hash, its outputs still have the
recorded digests (no SAE swapped in, no standalone ``analyze`` since), what it read is unchanged,
and (harvest) the source folder still holds the files it was harvested from. A stage that runs
again deletes only the files it wrote (:func:`branchlens.artifacts.discard_outputs`).

One file, over 450 lines, because the stage hashes, the output digests, the up-to-date check and
the locked run loop together decide whether a stage runs again, and must change together.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchlens import layout
from branchlens.artifacts import (
    ArtifactError,
    begin_outputs,
    content_digest,
    discard_outputs,
    finish_outputs,
    provenance,
    read_json,
    write_json,
)
from branchlens.config import STAGES, ConfigError, check_stages
from branchlens.presets import PRESET_NOTES, PRESETS  # noqa: F401  (their old home)
from branchlens.run import Run
from branchlens.schema import HarvestConfig, SAEOptions, validate_config
from branchlens.settings import MIXED4, NON_ARTIFACT  # noqa: F401  (MIXED4: its old home)

# Config blocks each stage's artifacts depend on (besides every upstream stage's): the ``sae``
# block is no stage of its own but shapes the trained weights.
STAGE_BLOCKS: dict[str, tuple[str, ...]] = {s: (s,) for s in STAGES} | {"train": ("sae", "train")}
RUN_KEYS = ("source", "variant", "seed", "paper_compat")  # top-level keys every stage depends on
# Folders a stage rewrites from scratch; its own files in them are removed first when it runs
# again after finishing, so no file made under the old settings or from the old inputs (a
# latent, a layer no longer run) survives into the new result. Files it did not write stay.
STAGE_DIRS = {"analyze": (layout.ANALYSIS,), "visualize": (f"{layout.VIZ}/{layout.FEATUREVIS}",),
              "examples": (f"{layout.VIZ}/{layout.EXAMPLES}",),
              "circuits": (f"{layout.VIZ}/{layout.CIRCUITS}",),
              "report": ("report",)}


@dataclass
class RunContext:
    out: Path
    config: dict[str, Any]
    weights: str | None
    device: str
    log: Callable[[str], None] = print
    state: dict[str, Any] = field(default_factory=dict)
    force: bool = False  # --force: stages that run start from scratch

    @property
    def layers(self) -> list[str]:
        return list(self.harvest.layers)

    @property
    def harvest(self) -> HarvestConfig:
        return HarvestConfig(**self.config.get("harvest", {}))


def make_config(preset: str | None, source: str | None = None, variant: str | None = None,
                overrides: dict[str, Any] | None = None,
                paper_compat: bool = False, seed: int | None = None) -> dict[str, Any]:
    """The preset (``None``: the overrides' ``preset`` key, else ``demo``), then ``overrides``
    (blocks merge key by key; a config file or ``--set``), then the explicit arguments;
    validated as a whole (:func:`branchlens.schema.validate_config`).
    """
    overrides = dict(overrides or {})
    named = overrides.pop("preset", None)  # a config file's preset; an explicit one wins
    preset = preset or named or "demo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg["preset"] = preset
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = copy.deepcopy(value)
    if source is not None:
        cfg["source"] = source
    if cfg.get("source") is None:
        raise ConfigError(f"preset {preset!r} needs an image SOURCE (e.g. an ImageNet train "
                          "folder)")
    if variant is not None:
        cfg["variant"] = variant
    if seed is not None:
        cfg["seed"] = seed
    cfg["paper_compat"] = paper_compat or bool(cfg.get("paper_compat"))
    return validate_config(cfg)


# What earlier versions left out of the hashes before NON_ARTIFACT grew: a run recorded under
# these hashes is the same run, so upgrading never retrains an SAE for a setting that changed
# nothing (see the loop in :func:`run`).
LEGACY_NON_ARTIFACT: dict[str, tuple[str, ...]] = {"train": ("progress", "keep_optimizer")}


def _artifact_settings(cfg: dict[str, Any], block: str,
                       non_artifact: dict[str, tuple[str, ...]] = NON_ARTIFACT) -> Any:
    """A block's settings minus those that change no artifact (:data:`NON_ARTIFACT`)."""
    value = cfg.get(block)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in non_artifact.get(block, ())}
    return value


def stage_hash(cfg: dict[str, Any], stage: str, weights_id: str | None,
               non_artifact: dict[str, tuple[str, ...]] = NON_ARTIFACT) -> str:
    """What a stage's output depends on: its own blocks and every upstream stage's."""
    upstream = STAGES[: STAGES.index(stage) + 1]
    key = {b: _artifact_settings(cfg, b, non_artifact) for s in upstream
           for b in STAGE_BLOCKS[s]}
    key |= {k: cfg.get(k) for k in RUN_KEYS}
    key["weights"] = weights_id
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_outputs(ctx: RunContext, stage: str) -> list[Path]:
    """Files (or folders) a finished stage must have left; one missing means the stage runs
    again, one whose digest changed too (:func:`outputs_digest`)."""
    run, layers = Run(ctx.out), ctx.layers
    if stage == "harvest":
        return [run.store_dir / "manifest.json"]
    if stage == "train":
        return [run.sae_dir(layer) / "weights.safetensors" for layer in layers]
    if stage == "analyze":
        return [run.summary_path, run.latent_table_path]
    if stage == "visualize":
        return [run.featurevis_dir(layer) for layer in layers]
    if stage == "examples":
        return [run.examples_dir(layer) for layer in layers]
    if stage == "circuits":
        return [run.circuits_path(a, b) for a, b in zip(layers, layers[1:], strict=False)]
    return [run.report_index]


def outputs_digest(ctx: RunContext, stage: str) -> dict[str, str]:
    """Run-relative path -> content digest of each output of ``stage`` that exists; a folder's
    covers every file in it but hidden ones (temp files, records)."""
    out = {}
    for p in stage_outputs(ctx, stage):
        rel = p.relative_to(ctx.out).as_posix()
        if p.is_file():
            out[rel] = content_digest(p)
        elif p.is_dir():
            h = hashlib.sha256()
            for f in sorted(p.rglob("*")):
                parts = f.relative_to(p).parts
                if f.is_file() and not any(x.startswith(".") for x in parts):
                    h.update(json.dumps(["/".join(parts), content_digest(f)]).encode())
            out[rel] = h.hexdigest()
    return out


def _combined(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


class _Outputs:
    """Each stage's :func:`outputs_digest`, read from disk once per ``run`` (and again after
    the stage ran)."""

    def __init__(self, ctx: RunContext):
        self.ctx, self._seen = ctx, {}

    def of(self, stage: str) -> dict[str, str]:
        if stage not in self._seen:
            self._seen[stage] = outputs_digest(self.ctx, stage)
        return self._seen[stage]

    def forget(self, stage: str) -> None:
        self._seen.pop(stage, None)

    def inputs(self, stage: str) -> dict[str, str]:
        """What ``stage`` reads: the outputs of every stage before it, one digest each."""
        return {u: _combined(self.of(u)) for u in STAGES[:STAGES.index(stage)]}


# -- stages ---------------------------------------------------------------------------------------

def _harvest(ctx: RunContext) -> dict:
    from branchlens.stages.harvest import harvest_run

    return harvest_run(ctx.out, ctx.config["source"], ctx.harvest, variant=ctx.config["variant"],
                       seed=ctx.config["seed"], paper_compat=ctx.config["paper_compat"],
                       weights=ctx.weights, device=ctx.device, log=ctx.log)


def _train(ctx: RunContext) -> dict:
    from branchlens.stages.train import train_run
    from branchlens.train import TrainConfig

    s = SAEOptions(**ctx.config.get("sae", {}))
    tcfg = TrainConfig(**ctx.config.get("train", {}), seed=ctx.config["seed"], device=ctx.device)
    saes = train_run(ctx.out, ctx.layers, s.sae_kwargs(), tcfg, s.expansion, force=ctx.force,
                     changed=ctx.state.get("changed", ()), log=ctx.log)
    return {"layers": sorted(saes)}


def _analyze(ctx: RunContext) -> dict:
    from branchlens.analysis.driver import AnalysisConfig
    from branchlens.stages.analyze import analyze

    acfg = AnalysisConfig(**ctx.config["analyze"], seed=ctx.config["seed"],
                          device="auto" if ctx.device == "auto" else ctx.device)
    summary = analyze(ctx.out, layers=ctx.layers, config=acfg, log=ctx.log)
    return {"layers": sorted(summary.get("layers", {}))}


def _visualize(ctx: RunContext) -> dict:
    from branchlens.stages.visualize import visualize_stage

    done = {}
    for layer in ctx.layers:
        ctx.log(f"[visualize] {layer}")
        visualize_stage(ctx.out, layer, **ctx.config["visualize"], seed=ctx.config["seed"],
                        weights=ctx.weights, device=ctx.device)
        done[layer] = ctx.config["visualize"]["n_latents"]
    return {"latents": done}


def _examples(ctx: RunContext) -> dict:
    from branchlens.stages.examples import examples_stage

    for layer in ctx.layers:
        ctx.log(f"[examples] {layer}")
        examples_stage(ctx.out, layer, **ctx.config["examples"], seed=ctx.config["seed"],
                       weights=ctx.weights, device=ctx.device)
    return {"layers": ctx.layers}


def _circuits(ctx: RunContext) -> dict:
    from branchlens.stages.circuits import circuits_stage

    pairs = list(zip(ctx.layers, ctx.layers[1:], strict=False))
    for up, down in pairs:
        ctx.log(f"[circuits] {up} -> {down}")
        circuits_stage(ctx.out, up, down, **ctx.config["circuits"], seed=ctx.config["seed"],
                       weights=ctx.weights, device=ctx.device)
    return {"pairs": [f"{a}->{b}" for a, b in pairs]}


def _report(ctx: RunContext) -> dict:
    from branchlens.stages.report import build_report

    path = build_report(ctx.out, **ctx.config["report"])
    ctx.log(f"[report] {path}")
    return {"path": str(path)}


STAGE_FUNCS: dict[str, Callable[[RunContext], dict]] = {
    "harvest": _harvest, "train": _train, "analyze": _analyze, "visualize": _visualize,
    "examples": _examples, "circuits": _circuits, "report": _report,
}


# -- driver ---------------------------------------------------------------------------------------

def run(out: str | Path, preset: str | None = "demo", source: str | None = None,
        weights: str | None = None, device: str = "auto", variant: str | None = None,
        paper_compat: bool = False, seed: int | None = None,
        overrides: dict[str, Any] | None = None,
        stages: list[str] | None = None, force: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage of an experiment in ``out``; returns the run record.

    The configuration is validated before anything is created; one process at a time holds
    ``out/.lock`` (released by the kernel if the process dies)."""
    from branchlens.store import RunLock

    cfg = make_config(preset, source, variant, overrides, paper_compat, seed)
    check_stages(stages)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    group = _process_group(device)
    try:
        if int(os.environ.get("RANK", "0")) != 0:
            return _run_follower(out, cfg, weights, device, stages, force)
        lock = RunLock(out, "run folder").acquire()
        try:
            return _run_locked(out, cfg, weights, device, stages, force, log)
        finally:
            lock.release()
    finally:
        if group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _process_group(device: str) -> bool:
    """Under torchrun: one process group for all stages (harvest's and train's collectives
    reuse it; a second group in one process races the rendezvous). gloo for objects and CPU
    tensors, nccl for CUDA ones. Returns whether this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True


DISTRIBUTED_STAGES = ("harvest", "train")  # the stages every torchrun rank takes part in


def _run_follower(out: Path, cfg: dict[str, Any], weights: str | None, device: str,
                  stages: list[str] | None, force: bool) -> dict[str, Any]:
    """A torchrun rank other than 0: joins the distributed stages that rank 0 will run (same
    decision from the same run.json) and writes no run-level file; rank 0 does the rest."""
    weights_id = None if weights is None else str(weights)
    record = _read_record(Run(out).record_path)
    record.setdefault("stages", {})
    ctx = RunContext(out, cfg, weights, device, lambda m: None)
    outputs = _Outputs(ctx)
    stages = stages if stages is not None else cfg.get("stages")
    for stage in DISTRIBUTED_STAGES:
        if stages is not None and stage not in stages:
            continue
        prev = record.get("stages", {}).get(stage)
        if force or not _up_to_date(ctx, prev if isinstance(prev, dict) else {}, stage,
                                    stage_hash(cfg, stage, weights_id), outputs):
            STAGE_FUNCS[stage](ctx)
            outputs.forget(stage)
    return record


def _read_record(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("stages", {}), dict):
        raise ArtifactError(f"{path} is not a run record; delete it to re-run every stage")
    return record


def _up_to_date(ctx: RunContext, prev: dict[str, Any], stage: str, h: str,
                outputs: _Outputs) -> bool:
    """Whether ``stage`` can be skipped; says why not when the record alone would claim so.
    Sets ``ctx.state["changed"]``: outputs that differ from what this stage wrote."""
    ctx.state["changed"] = []
    if prev.get("status") != "done" or prev.get("config_hash") != h:
        return False
    missing = [p for p in stage_outputs(ctx, stage) if not p.exists()]
    if missing:
        ctx.log(f"[{stage}] recorded as done but {missing[0]} is missing: running again")
        return False
    now, then = outputs.of(stage), prev.get("outputs")
    if then is None:
        return True  # recorded by an older branchlens: checksummed from now on (see the caller)
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        ctx.state["changed"] = changed
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        ctx.log(f"[{stage}] {changed[0]}{more} is not what this stage wrote (replaced, or "
                "written by another command since): running again")
        return False
    read, was = outputs.inputs(stage), prev.get("inputs")
    if was is not None and was != read:
        up = next(u for u in read if read[u] != was.get(u))
        ctx.log(f"[{stage}] the {up} outputs it read have changed since: running again")
        return False
    if stage == "harvest":
        return _same_source(ctx)
    return True


def _same_source(ctx: RunContext) -> bool:
    """Whether the source folder still holds the files the store was harvested from."""
    from branchlens.harvest.fingerprint import describe_change, spec_fingerprint

    then = (Run(ctx.out).store_manifest().get("source") or {}).get("fingerprint")
    if not then:
        return True  # nothing recorded (embedded, hf:, wds:, an older store)
    change = describe_change(then, spec_fingerprint(ctx.config["source"], ctx.config["variant"]))
    if change:
        ctx.log(f"[harvest] the image source changed since the harvest ({change}): "
                "harvesting again into a clean store")
    return change is None


def _restarts(prev: dict[str, Any], h: str, inputs: dict[str, str]) -> bool:
    """Whether a stage about to run must first delete its own earlier files: it finished
    before (so what made them changed), or ran under other settings or inputs (not a resume)."""
    return bool(prev) and (prev.get("status") == "done" or prev.get("config_hash") != h
                           or prev.get("inputs", inputs) != inputs)


def _run_locked(out: Path, cfg: dict[str, Any], weights: str | None, device: str,
                stages: list[str] | None, force: bool, log: Callable[[str], None]
                ) -> dict[str, Any]:
    weights_id = None if weights is None else str(weights)
    record_path = Run(out).record_path
    record = _read_record(record_path)
    record.update(provenance(config=cfg, weights=weights_id, device=device))
    record.setdefault("stages", {})
    ctx = RunContext(out, cfg, weights, device, log, force=force)
    outputs = _Outputs(ctx)
    stages = stages if stages is not None else cfg.get("stages")
    wanted = [s for s in STAGES if s in STAGE_FUNCS and (stages is None or s in stages)]

    for stage in wanted:
        h = stage_hash(cfg, stage, weights_id)
        prev = record["stages"].get(stage)
        prev = prev if isinstance(prev, dict) else {}
        if prev.get("config_hash") not in (None, h) and prev["config_hash"] == stage_hash(
                cfg, stage, weights_id, LEGACY_NON_ARTIFACT):
            prev["config_hash"] = h  # recorded by an older branchlens under the same settings
        inputs = outputs.inputs(stage)
        if not force and _up_to_date(ctx, prev, stage, h, outputs):
            if "outputs" not in prev:  # an older branchlens's record: checksummed from now on
                prev.update(outputs=outputs.of(stage), inputs=inputs)
                write_json(record_path, record)
            log(f"[{stage}] up to date, skipped")
            continue
        if force or _restarts(prev, h, inputs):
            why = ("--force" if force else f"{stage} settings changed"
                   if prev.get("config_hash") != h else f"{stage} runs again")
            for sub in STAGE_DIRS.get(stage, ()):
                discard_outputs(out / sub, log, why)
        for sub in STAGE_DIRS.get(stage, ()):
            begin_outputs(out / sub)
        log(f"[{stage}] running")
        record["stages"][stage] = {"status": "running", "config_hash": h,
                                   "settings": {b: cfg.get(b) for b in STAGE_BLOCKS[stage]},
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "inputs": inputs}
        write_json(record_path, record)
        t0 = time.perf_counter()
        try:
            info = STAGE_FUNCS[stage](ctx)
        except BaseException as e:
            record["stages"][stage].update(status="failed", error=f"{type(e).__name__}: {e}",
                                           seconds=round(time.perf_counter() - t0, 2))
            write_json(record_path, record)
            raise
        for sub in STAGE_DIRS.get(stage, ()):
            finish_outputs(out / sub)
        outputs.forget(stage)
        record["stages"][stage].update(status="done", seconds=round(time.perf_counter() - t0, 2),
                                       info=info, outputs=outputs.of(stage))
        write_json(record_path, record)
        log(f"[{stage}] done in {record['stages'][stage]['seconds']:.1f}s")
    return record
