"""Checkpoints and resume: weights + Adam state + batch counters, written optimizer-first so a
kill at any point leaves a consistent pair; a checkpoint resumes only under the same settings
(``resume_key``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from branchlens.artifacts import ArtifactError, discard_outputs, load_tensors, save_tensors
from branchlens.sae import SAEConfig, TopKSAE, load_meta
from branchlens.train.config import NON_ARTIFACT_KEYS, NonFiniteLossError, TrainConfig

# The files training writes into an SAE folder, deleted in this order when it starts clean (the
# weights first: without them the folder no longer looks trained); any other file stays.
TRAIN_OUTPUTS = ("weights.safetensors", "cfg.json", "optim-step*.safetensors", "metrics.jsonl",
                 "metrics.png", ".*.tmp")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def optim_path(out: Path, step: int) -> Path:
    """The Adam state file of checkpoint ``step`` (its weights are ``weights.safetensors``)."""
    return out / f"optim-step{step:09d}.safetensors"


def save_checkpoint(out: Path, sae: TopKSAE, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Optimizer file for this step first, then the weights that name the step, then cleanup:
    a kill at any point leaves a weights file whose optimizer file exists."""
    step = meta["train"]["step"]
    names = {id(p): n for n, p in sae.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{key}"] = torch.as_tensor(val).detach().clone()
    save_tensors(optim_path(out, step), tensors, {"step": step})
    sae.save(out, meta)
    for f in out.glob("optim-step*.safetensors"):
        if f != optim_path(out, step):
            f.unlink(missing_ok=True)


def load_optimizer_state(out: Path, step: int, sae: TopKSAE, opt: torch.optim.Optimizer,
                         require_checksum: bool = True) -> None:
    """Adam state of ``step``, checksum-verified and finite, into ``opt``."""
    path = optim_path(out, step)
    if not path.exists():
        raise ArtifactError(f"{out}: weights of step {step} but no {path.name}; delete {out} to "
                            "train from scratch")
    tensors, meta = load_tensors(path, require_checksum=require_checksum)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ArtifactError(f"{path}: non-finite optimizer state {bad}")
    if meta.get("step") != step:
        raise RuntimeError(f"optimizer file for step {step} says step {meta.get('step')}")
    for n, p in sae.named_parameters():
        state = {key.removeprefix(n + "."): t for key, t in tensors.items()
                 if key.rsplit(".", 1)[0] == n}
        if state:
            opt.state[p] = {k: t.to(p.device) if t.dim() else t for k, t in state.items()}



def resume_key(sae_cfg: SAEConfig, cfg: TrainConfig, meta: dict[str, Any] | None) -> str:
    """Hash of everything the trained weights depend on: a checkpoint resumes only under the
    same key (another lr, k, width, seed or store means starting clean)."""
    import hashlib

    body = {"sae": sae_cfg.to_dict(),
            "train": {k: v for k, v in asdict(cfg).items() if k not in NON_ARTIFACT_KEYS},
            "data": {k: v for k, v in (meta or {}).items() if k != "store"}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


SAE_DERIVED = ("scale", "var_total")  # fixed from the data at init, not chosen


def _settings_diff(old: dict[str, Any], sae_cfg: SAEConfig, cfg: TrainConfig,
                   meta: dict[str, Any] | None) -> list[str]:
    """Settings (``sae.*``, ``train.*``, data) in which a saved SAE's document ``old`` differs
    from the requested ones; empty when it was trained exactly so."""
    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    old_sae, old_train = old.get("sae", {}), old.get("train", {}).get("config", {})
    diff = [f"sae.{k}" for k, v in sae_cfg.to_dict().items()
            if k not in SAE_DERIVED and norm(v) != old_sae.get(k)]
    diff += [f"train.{k}" for k, v in asdict(cfg).items()
             if k not in NON_ARTIFACT_KEYS and norm(v) != old_train.get(k)]
    diff += [f"data.{k}" for k, v in (meta or {}).items()
             if k != "store" and norm(v) != old.get(k)]
    return diff


def check_finite(sae: TopKSAE, step: int, what: str) -> None:
    """Refuse parameters that are NaN or infinite (``what`` names where they came from)."""
    bad = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(f"{what} at step {step}: parameters {bad} are not finite")


def open_resume(out: Path, key: str, sae_cfg: SAEConfig, cfg: TrainConfig,
                meta: dict[str, Any] | None, restart: bool, log: Callable[[str], None]
                ) -> bool:
    """Whether ``out`` holds a checkpoint of these exact settings to resume; a checkpoint of
    other settings is discarded (``restart``) or refused, never resumed. A checkpoint of an
    older branchlens (no resume key) is kept when every recorded setting matches."""
    if not (out / "weights.safetensors").exists():
        return False
    try:
        old = load_meta(out)
    except Exception as e:  # a corrupt checkpoint is reported, never silently replaced
        raise type(e)(f"{e}; delete {out} to train from scratch") from e
    old_key = old.get("train", {}).get("resume_key")
    if old_key == key:
        return True
    diff = _settings_diff(old, sae_cfg, cfg, meta)
    if old_key is None and not diff:
        log(f"[train] {out}: written by an older branchlens with the same settings; resuming")
        return True
    why = ", ".join(diff) or "settings"
    if not restart:
        raise ValueError(f"{out} holds an SAE trained with other settings ({why}); pass "
                         "--restart to discard it, or use another output folder")
    discard_outputs(out, log, f"settings changed ({why})", owned=TRAIN_OUTPUTS)
    return False
