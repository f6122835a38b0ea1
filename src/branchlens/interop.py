"""SAE files for other tools: SAELens folders and the paper notebook's state dict.

branchlens keeps a fixed input scale ``s`` inside its SAE (``z = TopK(W(s·x − b_pre) +
b_latent)``, ``x̂ = (W_dec z + b_pre)/s``). The exports fold ``s`` into the weights, so each
file works on raw activations with its tool's plain formulas:

- SAELens (``cfg.json`` + ``sae_weights.safetensors``, architecture ``topk``):
  ``z = ReLU(TopK_k((x − b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec`` with ``W_enc``
  [d_in, d_sae] and ``W_dec`` [d_sae, d_in]; the same codes and reconstructions as branchlens.
  SAELens takes ``x`` as ``[..., d_in]`` (channels last); branchlens's ``encode`` also takes a
  feature map ``[B, C, H, W]`` with ``channel_dim=1``: move the channels last for SAELens.
- the paper notebook (``sae.pt``): its SAE class (``W_enc`` an ``nn.Linear`` without bias,
  ``W_dec`` a module holding that same linear and applying its transpose, ``b_pre``,
  ``b_latent``) loads the file strictly. Only a tied SAE fits that class. Its weights are
  ``W`` itself with ``b_pre/s`` and ``b_latent/s``: TopK and ReLU commute with the positive
  factor ``1/s``, so the notebook picks the same latents and reconstructs exactly, and its
  codes are branchlens's codes times ``1/s`` (``cfg.json`` records ``input_scale`` = s).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from branchlens.artifacts import load_tensors, read_json, save_tensors, write_atomic, write_json
from branchlens.layout import RunLayout
from branchlens.sae import SAEConfig, TopKSAE, import_paper_checkpoint

FORMATS = ("saelens", "paper")
SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"
# SAELens reads a cfg.json's ``metadata`` block as written only when it names a SAELens version
# of 6 or later; older files get their metadata rebuilt from language-model keys (ours lost).
SAELENS_FORMAT_VERSION = "6.0.0"
PAPER_FILE = "sae.pt"
SAE_FILES = ("weights.safetensors", "cfg.json")  # a branchlens SAE folder (TopKSAE.save)


def saelens_tensors(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec with the input scale folded in."""
    s = sae.cfg.scale
    return {"W_enc": (sae.W_enc.detach().float() * s).t().contiguous(),
            "b_enc": sae.b_latent.detach().float().clone(),
            "W_dec": (sae.W_dec_rows.detach().float() / s).contiguous(),
            "b_dec": (sae.b_pre.detach().float() / s).contiguous()}


def export_saelens(sae: TopKSAE, out_dir: str | Path, hook_name: str | None = None,
                   model_name: str | None = None) -> Path:
    """Write a SAELens TopK folder. ``metadata`` (SAELens 6) carries the hook, the model and a
    ``branchlens`` block (layer, variant, branch slices, decoder, folded scale); the same keys
    also stand at the top level, where SAELens 5 and older read them."""
    cfg = sae.cfg
    out = Path(out_dir)
    hook, model = hook_name or cfg.layer, model_name or cfg.variant
    doc = {
        "architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.n_latents, "k": cfg.k,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "activation_fn": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": cfg.k},
        "hook_name": hook, "model_name": model,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION,
                     "sae_lens_training_version": None,  # trained by branchlens, not SAELens
                     "hook_name": hook, "model_name": model,
                     "branchlens": {"layer": cfg.layer, "variant": cfg.variant,
                                    "branch_slices": cfg.branch_slices,
                                    "decoder": cfg.decoder, "input_scale_folded": cfg.scale}},
    }
    _check_export_folder(out)
    save_tensors(out / SAELENS_WEIGHTS, saelens_tensors(sae))
    write_json(out / SAELENS_CFG, doc)
    return out


def _saelens_k(doc: dict[str, Any], where: Path) -> int:
    arch = str(doc.get("architecture", "")).lower()
    act = str(doc.get("activation_fn") or doc.get("activation_fn_str") or "").lower()
    if arch != "topk" and act != "topk":
        raise ValueError(f"{where}: a {arch or act or 'non-TopK'} SAE; only TopK SAEs import")
    k = doc.get("k", (doc.get("activation_fn_kwargs") or {}).get("k"))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # JSON true is no k
        raise ValueError(f"{where}: no TopK k in the config (got {k!r})")
    for key, ok in (("normalize_activations", ("none", None)),
                    ("rescale_acts_by_decoder_norm", (False, None)),
                    ("reshape_activations", ("none", None))):
        if doc.get(key) not in ok:
            raise ValueError(f"{where}: {key}={doc.get(key)!r} cannot be imported (only "
                             f"{ok[0]!r})")
    return k


def _layer_config(where: Path, d: int, n: int, doc: dict[str, Any], layer: str | None,
                  variant: str | None) -> SAEConfig:
    """Which layer the SAE reads: ``--layer``/``--variant``; else the ``branchlens`` block of
    our own export; else SAELens's ``hook_name``/``model_name`` (``metadata``, or the top level
    of files older than SAELens 6), used only when they name a layer of a variant whose width
    is the SAE's ``d_in``. Anything else is refused: an SAE without its layer has no branches."""
    from branchlens.variants import VARIANTS

    meta = doc.get("metadata") or {}
    ours = meta.get("branchlens") if isinstance(meta.get("branchlens"), dict) else None
    if layer is None and ours is not None:  # our export: taken as written, layer-less too
        return SAEConfig(d_in=d, n_latents=n, k=1, layer=ours.get("layer"),
                         variant=variant or ours.get("variant"),
                         branch_slices=ours.get("branch_slices") or {})
    given = layer is not None
    layer = layer or meta.get("hook_name") or doc.get("hook_name")
    variant = variant or meta.get("model_name") or doc.get("model_name")
    ask = "pass --layer (and --variant) to say which layer it reads"
    if not layer:
        raise ValueError(f"{where}: the SAE names no layer (metadata.hook_name); {ask}")
    if variant not in VARIANTS:
        said = f"--layer {layer}" if given else f"metadata.hook_name {layer!r}"
        raise ValueError(f"{where}: {said} but model {variant!r} is not a variant "
                         f"({', '.join(VARIANTS)}); {ask}")
    try:
        cfg = SAEConfig.for_layer(variant, layer, expansion=1, k=1)
    except KeyError:
        raise ValueError(f"{where}: {layer!r} is not a layer of {variant}; {ask}") from None
    if cfg.d_in != d:
        raise ValueError(f"{where}: {variant} {layer} has {cfg.d_in} channels but the SAE reads "
                         f"{d}; {ask}")
    return cfg


def import_saelens(in_dir: str | Path, layer: str | None = None,
                   variant: str | None = None) -> TopKSAE:
    """A SAELens TopK folder -> a branchlens SAE computing the same function (scale 1).

    Without ``apply_b_dec_to_input`` the encoder sees raw ``x``; that is folded into
    ``b_latent`` (``b_enc + b_dec·W_enc``) since branchlens always centres by ``b_pre``."""
    where = Path(in_dir)
    if not (where / SAELENS_CFG).is_file() or not (where / SAELENS_WEIGHTS).is_file():
        raise FileNotFoundError(f"{where} is not a SAELens folder ({SAELENS_CFG} + "
                                f"{SAELENS_WEIGHTS})")
    doc = read_json(where / SAELENS_CFG)
    k = _saelens_k(doc, where)
    t, _ = load_tensors(where / SAELENS_WEIGHTS)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in t]
    if missing:
        raise ValueError(f"{where / SAELENS_WEIGHTS} lacks {missing}")
    w_enc, w_dec = t["W_enc"].float(), t["W_dec"].float()
    d, n = w_enc.shape
    if w_dec.shape != (n, d) or t["b_enc"].shape != (n,) or t["b_dec"].shape != (d,):
        raise ValueError(f"{where}: tensor shapes do not fit W_enc {tuple(w_enc.shape)}")
    cfg = _layer_config(where, d, n, doc, layer, variant)
    cfg = dataclasses.replace(cfg, n_latents=n, k=k, decoder="untied", aux=False, scale=1.0)
    b_dec, b_enc = t["b_dec"].float(), t["b_enc"].float()
    if doc.get("apply_b_dec_to_input") is False:
        b_enc = b_enc + b_dec @ w_enc
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc.t())
        sae.W_dec.copy_(w_dec)
        sae.b_latent.copy_(b_enc)
        sae.b_pre.copy_(b_dec)
    return sae


def paper_state_dict(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """The notebook's state dict of a tied SAE (see the module docstring): one ``W`` [n, d] as
    both ``W_enc.weight`` and ``W_dec.linear.weight``, biases divided by the input scale."""
    if sae.cfg.decoder != "tied":
        raise ValueError(f"{sae.cfg.layer or 'this SAE'} has an untied decoder, which the paper's "
                         "format cannot hold (its notebook reuses the encoder weight as the "
                         "decoder); export it with --format saelens instead")
    s = sae.cfg.scale
    w = sae.W_enc.detach().float().contiguous()
    return {"W_enc.weight": w, "W_dec.linear.weight": w,  # one tensor, saved once
            "b_pre": (sae.b_pre.detach().float() / s).contiguous(),
            "b_latent": (sae.b_latent.detach().float() / s).contiguous()}


def export_paper(sae: TopKSAE, out_dir: str | Path) -> Path:
    """``sae.pt`` (the notebook's state dict) plus a ``cfg.json`` with k, the layer and the
    input scale its codes are divided by. Untied SAEs are refused (:func:`paper_state_dict`)."""
    out = Path(out_dir)
    _check_export_folder(out)
    state = paper_state_dict(sae)
    write_atomic(out / PAPER_FILE, lambda tmp: torch.save(state, tmp))
    write_json(out / "cfg.json", {"format": "paper", "k": sae.cfg.k, "layer": sae.cfg.layer,
                                  "variant": sae.cfg.variant, "d_in": sae.cfg.d_in,
                                  "n_latents": sae.cfg.n_latents,
                                  "input_scale": sae.cfg.scale,
                                  "codes": "branchlens codes / input_scale",
                                  "branch_slices": sae.cfg.branch_slices})
    return out


def _check_export_folder(out: Path) -> None:
    """Both formats write a ``cfg.json``: exporting into a branchlens SAE folder (``--out
    RUN/sae/<layer>``) would replace the config the report and the pipeline read."""
    if all((out / name).is_file() for name in SAE_FILES):
        raise FileExistsError(f"{out} holds a branchlens SAE ({' + '.join(SAE_FILES)}) that the "
                              "export would overwrite; pass another --out")


def save_imported(sae: TopKSAE, out_dir: str | Path, source: str, force: bool = False) -> Path:
    """Write an imported SAE into ``out_dir`` under the lock training takes on that folder, so
    a training in progress is refused; an SAE already there is replaced only with ``force``."""
    from branchlens.store import RunLock

    out = Path(out_dir)
    lock = RunLock(out.parent, "SAE folder", f".{out.name}.lock").acquire()
    try:
        if (out / SAE_FILES[0]).is_file() and not force:
            raise FileExistsError(f"{out} already holds an SAE ({SAE_FILES[0]}); pass --force "
                                  "to replace it, or import into another folder")
        sae.save(out, {"imported_from": str(source)})
    finally:
        lock.release()
    return out


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir() and (p / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (p.is_dir() and (p / PAPER_FILE).is_file()) or p.suffix in (".pt", ".pth",
                                                                   ".safetensors"):
        return "paper"
    raise ValueError(f"{p}: neither a SAELens folder ({SAELENS_WEIGHTS}) nor a paper state "
                     f"dict (.pt/.pth, or a folder with {PAPER_FILE})")


def _finite(sae: TopKSAE, where: str | Path) -> TopKSAE:
    """Refuse NaN/inf weights now: the analysis would otherwise die on them much later."""
    bad = [n for n, t in sae.named_parameters() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{where}: non-finite values in {', '.join(bad)}; not importing")
    return sae


def _read_paper_state(p: Path) -> dict[str, torch.Tensor]:
    """The notebook's state dict in the layout :func:`import_paper_checkpoint` reads: its tied
    ``W_dec.linear.weight`` is the encoder weight again (dropped), any other one is an
    untied decoder [n, d] (given as ``W_dec.weight`` [d, n])."""
    if p.suffix == ".safetensors":
        state, _ = load_tensors(p)
    else:
        from branchlens.weights import safe_torch_load

        state = safe_torch_load(p)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    missing = [k for k in ("W_enc.weight", "b_pre", "b_latent") if k not in state]
    if missing:
        raise ValueError(f"{p}: not the paper's SAE state dict (no {', '.join(missing)})")
    state = dict(state)
    linear = state.pop("W_dec.linear.weight", None)
    if linear is not None and not torch.equal(linear, state["W_enc.weight"]):
        state["W_dec.weight"] = linear.t()
    return state


def import_sae(path: str | Path, fmt: str = "auto", k: int | None = None,
               layer: str | None = None, variant: str | None = None) -> TopKSAE:
    """Either format into a branchlens SAE (``k`` is needed for a bare paper state dict).

    A paper folder written by :func:`export_paper` gives back the exported SAE itself (its
    ``input_scale`` is restored, so the codes are branchlens's again); a bare state dict is
    taken at scale 1 and gives the notebook's own codes."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown SAE format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "saelens":
        return _finite(import_saelens(path, layer, variant), path)
    p = Path(path)
    info: dict[str, Any] = {}
    if p.is_dir():
        info = read_json(p / "cfg.json") if (p / "cfg.json").is_file() else {}
        k = k or info.get("k")
        layer, variant = layer or info.get("layer"), variant or info.get("variant")
        p = p / PAPER_FILE
    if not k:
        raise ValueError(f"{p}: the paper's state dict does not record k; pass --k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{p}: k must be a positive integer, got {k!r}")
    sae = import_paper_checkpoint(_read_paper_state(p), k=k, layer=layer,
                                  variant=variant if layer else None)
    scale = info.get("input_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        with torch.no_grad():  # undo the export's b/s: the original SAE, codes and all
            sae.b_pre.mul_(scale)
            sae.b_latent.mul_(scale)
        sae.cfg.scale = float(scale)
    if not sae.cfg.branch_slices and sae.cfg.layer == info.get("layer"):
        sae.cfg.branch_slices = info.get("branch_slices") or {}
    return _finite(sae, p)


def export_run_sae(run_dir: str | Path, layer: str, fmt: str, out: str | Path | None = None
                   ) -> Path:
    """Export ``RUN/sae/<layer>`` in ``fmt``; default folder ``RUN/export/<layer>-<fmt>``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    src = RunLayout(run_dir).sae_dir(layer)
    if not (src / "weights.safetensors").is_file():
        raise FileNotFoundError(f"no trained SAE for {layer} in {run_dir} ({src})")
    sae = TopKSAE.load(src)
    dest = Path(out) if out is not None else Path(run_dir) / "export" / f"{layer}-{fmt}"
    return export_saelens(sae, dest) if fmt == "saelens" else export_paper(sae, dest)
