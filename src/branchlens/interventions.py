"""Interventions: run the network with one layer's activation moved along chosen SAE latents.

The edit is ``x' = x + Σ_i (α_i − 1)·z_i·d_i`` with the SAE's own codes ``z_i`` of ``x`` and its
decoder directions ``d_i`` (input units). Only the latents' own contributions change, so the
SAE's reconstruction error stays in ``x'``: α = 1 is the unmodified network exactly, α = 0
removes the latent's part of the activation (ablation), α = 2 doubles it (steering).

Everything here takes a model, an SAE and tensors; the effects stage (``stages/effects.py``)
reads a run folder and calls these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from branchlens.analysis.categories import ANIMAL, CATEGORIES, CATEGORY_OF_CLASS
from branchlens.variants import branch_slices

MIN_LATENTS = 5  # robust latents of the branch before its causal test counts
MIN_IMAGES = 20  # held-out images before a layer's causal test counts
ANIMAL_CLASSES: np.ndarray = np.flatnonzero(
    np.isin(CATEGORY_OF_CLASS, [CATEGORIES.index(c) for c in ANIMAL]))


def check_latents(sae, latents: Sequence[int], scale: float | Sequence[float] | None = None,
                  alive: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """(latent ids, per-latent α) validated before any forward pass: ids in range, not dead
    (``alive`` [n] when the caller knows it, else the SAE's own dead counter), α finite."""
    n = sae.cfg.n_latents
    ids = [int(i) for i in latents]
    if not ids:
        raise ValueError("no latents given: pass at least one latent id")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"latent id(s) {bad} out of range: {sae.cfg.layer} has latents "
                         f"0..{n - 1}")
    if alive is None:
        alive = ~sae.dead_mask().cpu().numpy()
    dead = [i for i in ids if not bool(alive[i])]
    if dead:
        raise ValueError(f"latent(s) {dead} of {sae.cfg.layer} are dead (never fire on the "
                         "held-out data): an intervention on them changes nothing")
    if scale is None:
        scale = 0.0
    alphas = [float(scale)] * len(ids) if np.isscalar(scale) else [float(a) for a in scale]
    if len(alphas) != len(ids):
        raise ValueError(f"{len(alphas)} scales for {len(ids)} latents: give one, or one each")
    if not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return torch.tensor(ids), torch.tensor(alphas)


def latent_codes(sae, h: Tensor, latents: Tensor) -> Tensor:
    """Codes of ``latents`` at every position of a feature map ``h`` [B, C, H, W] →
    [B, L, H, W], from the sparse TopK code (the dense [B, n, H, W] is never formed)."""
    b, c, hh, ww = h.shape
    flat = h.permute(0, 2, 3, 1).reshape(-1, c)
    with torch.no_grad():
        vals, idx = sae.encode_sparse(flat)
        hit = idx[:, :, None] == latents.to(idx.device)[None, None]  # [P, k, L]
        z = (vals[:, :, None] * hit).sum(1)  # [P, L]
    return z.reshape(b, hh, ww, -1).permute(0, 3, 1, 2)


def latent_delta(sae, h: Tensor, latents: Tensor, alphas: Tensor,
                 positions: Tensor | None = None) -> Tensor:
    """``Σ_i (α_i − 1)·z_i·d_i`` as a feature map like ``h``; ``positions`` [H, W] (bool)
    restricts the change to those units."""
    z = latent_codes(sae, h, latents)  # [B, L, H, W]
    coef = z * (alphas.to(z) - 1).view(1, -1, 1, 1)
    if positions is not None:
        coef = coef * positions.to(coef)[None, None]
    d = sae.decoder_directions()[latents.to(sae.W_enc.device)].to(h)  # [L, C]
    return torch.einsum("blhw,lc->bchw", coef, d)


def tail(model: nn.Module, layer: str):
    """``h → logits`` from ``layer``'s output when ``layer`` is a block output (one prefix
    reused for many edits), else None. The SAE and cached activations may stay on the CPU
    while the network runs on a GPU."""
    blocks = {b.name for b in model.variant.blocks}
    if layer not in blocks:
        return None
    dev = next(model.parameters()).device

    def go(h: Tensor) -> Tensor:  # on the model's device; logits where ``h`` lives
        return model.forward_between(h.to(dev), layer, "logits").to(h.device)

    return go


@dataclass
class Intervention:
    """Logits of the same images before and after an edit."""

    before: Tensor  # [N, classes]
    after: Tensor
    ids: list[str] | None = None  # the images' names, when the caller knows them

    @property
    def p_before(self) -> Tensor:
        return self.before.softmax(-1)

    @property
    def p_after(self) -> Tensor:
        return self.after.softmax(-1)

    @property
    def delta_p(self) -> Tensor:
        return self.p_after - self.p_before

    def summary(self, k: int = 5) -> dict:
        """Top-k before/after per image, the mean change per class, and the largest change of
        any class probability over the images."""
        pb, pa, dp = self.p_before, self.p_after, self.delta_p
        mean = dp.mean(0)
        order = mean.abs().argsort(descending=True)[:k]
        return {"n_images": int(pb.shape[0]),
                "max_abs_delta_prob": float(dp.abs().max()) if dp.numel() else 0.0,
                "top1_changed": int((pb.argmax(1) != pa.argmax(1)).sum()),
                "mean_delta_prob": [[int(c), float(mean[c])] for c in order],
                "images": [{"id": self.ids[i] if self.ids else i, "before": _topk(pb[i], k),
                            "after": _topk(pa[i], k)} for i in range(pb.shape[0])]}


def _topk(p: Tensor, k: int) -> list[list]:
    v, i = p.topk(min(k, p.numel()))
    return [[int(c), float(x)] for c, x in zip(i, v, strict=True)]


def intervene(model: nn.Module, sae, layer: str, images: Tensor, latents: Sequence[int],
              scale: float | Sequence[float] = 0.0, positions: Tensor | None = None,
              batch_size: int = 16, alive: np.ndarray | None = None) -> Intervention:
    """Logits of model inputs ``images`` [N, 3, S, S] before and after scaling ``latents`` of
    ``layer`` by ``scale`` (α) at every position, or at ``positions`` [H, W]."""
    ids, alphas = check_latents(sae, latents, scale, alive)
    dev = next(model.parameters()).device
    go = tail(model, layer)
    before, after = [], []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(dev)
            if go is not None:
                h = model(x, [layer])[layer]
                before.append(go(h).cpu())
                after.append(go(h + latent_delta(sae, h, ids, alphas, positions)).cpu())
            else:  # a branch output: edit it inside the full pass
                before.append(model(x).cpu())
                after.append(model(x, edits={layer: lambda h: h + latent_delta(
                    sae, h, ids, alphas, positions)}).cpu())
    if not before:
        raise ValueError("no images to intervene on")
    return Intervention(torch.cat(before), torch.cat(after))


# -- what each latent does to the classes --------------------------------------------------------

@dataclass
class SparseCodes:
    """The SAE's TopK code of every position of cached activations, computed once: the
    per-latent ablations read their latent's map from here instead of re-encoding."""

    vals: Tensor  # [N, P, k]
    idx: Tensor  # [N, P, k]

    def maps(self, rows: Tensor, latents: Tensor) -> Tensor:
        """Code of ``latents[b]`` on image ``rows[b]`` at every position, [B, P]."""
        hit = self.idx[rows] == latents.view(-1, 1, 1).to(self.idx.device)
        return (self.vals[rows] * hit).sum(2)

    def image_max(self, n_latents: int) -> Tensor:
        """Largest code of every latent on every image, [N, n_latents]."""
        n, p, k = self.vals.shape
        out = torch.zeros(n, n_latents, dtype=self.vals.dtype)
        return out.scatter_reduce(1, self.idx.reshape(n, -1), self.vals.reshape(n, -1), "amax")


def sparse_codes(sae, h: Tensor, batch: int = 16) -> SparseCodes:
    vals, idx = [], []
    with torch.no_grad():
        for s in range(0, h.shape[0], batch):
            hs = h[s:s + batch]
            b, c, hh, ww = hs.shape
            v, i = sae.encode_sparse(hs.permute(0, 2, 3, 1).reshape(-1, c))
            vals.append(v.reshape(b, hh * ww, -1).cpu())
            idx.append(i.reshape(b, hh * ww, -1).cpu())
    return SparseCodes(torch.cat(vals), torch.cat(idx))


def clean_probabilities(go, h: Tensor, batch: int = 32) -> Tensor:
    with torch.no_grad():
        return torch.cat([go(h[s:s + batch]).softmax(-1) for s in range(0, h.shape[0], batch)])


def ablation_effects(go, sae, h: Tensor, codes: SparseCodes, clean: Tensor,
                     tops: Sequence[Sequence[int]], latents: Sequence[int],
                     batch_size: int = 32) -> Tensor:
    """Mean Δp [L, classes] when latent ``latents[j]`` alone is ablated (α = 0, every position)
    on its own top images ``tops[j]`` (indices into the cached activations ``h`` [N, C, H, W],
    their ``codes`` and ``clean`` probabilities); ``go`` maps activations to logits
    (:func:`tail`). One (latent, image) pair per batch row: one tail pass each."""
    pairs = [(j, i) for j, imgs in enumerate(tops) for i in imgs]
    if not pairs:
        raise ValueError("no (latent, image) pairs to ablate")
    ids = torch.tensor([int(la) for la in latents])
    dirs = sae.decoder_directions().cpu()
    sums = torch.zeros(len(ids), clean.shape[1])
    counts = torch.zeros(len(ids))
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            js = torch.tensor([j for j, _ in pairs[s:s + batch_size]])
            rows = torch.tensor([i for _, i in pairs[s:s + batch_size]])
            hs = h[rows]
            z = codes.maps(rows, ids[js]).reshape(len(js), 1, *hs.shape[-2:])
            d = dirs[ids[js]].to(hs)  # [B, C]
            dp = go(hs - z * d[:, :, None, None]).softmax(-1) - clean[rows]
            sums.index_add_(0, js, dp.cpu())
            counts.index_add_(0, js, torch.ones(js.numel()))
    return sums / counts.clamp_min(1)[:, None]


def named_classes(dp: Tensor, names: Sequence[str], k: int = 3,
                  min_abs: float = 1e-4) -> tuple[list[str], list[str]]:
    """(promotes, suppresses) per latent from the ablation Δp [L, classes]: a latent promotes
    the classes whose probability falls most when it is removed, suppresses those that rise."""
    promotes, suppresses = [], []
    for row in dp:
        lo = row.argsort()[:k].tolist()
        hi = row.argsort(descending=True)[:k].tolist()
        promotes.append("; ".join(f"{names[c]} ({-float(row[c]):+.2g})" for c in lo
                                  if -row[c] > min_abs))
        suppresses.append("; ".join(f"{names[c]} ({-float(row[c]):+.2g})" for c in hi
                                    if row[c] > min_abs))
    return promotes, suppresses


# -- the animal claim, causally ------------------------------------------------------------------

def animal_mass(logits: Tensor) -> Tensor:
    """Probability mass on ImageNet's animal classes (0–397) per image."""
    return logits.softmax(-1)[:, torch.as_tensor(ANIMAL_CLASSES)].sum(1)


def set_ablation_drops(go, sae, h: Tensor, sets: dict[str, Sequence[int]],
                       branch: tuple[str, slice] | None = None,
                       batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per image, the drop in animal mass when each latent set is ablated together (α = 0,
    every position), and when the channels of ``branch`` are zeroed (the whole branch)."""
    def ablate(ids: Tensor):
        return lambda hs: hs + latent_delta(sae, hs, ids, torch.zeros(len(ids)))

    def zero_branch(hs: Tensor) -> Tensor:
        edited = hs.clone()
        edited[:, branch[1]] = 0
        return edited

    edits = {name: ablate(torch.tensor([int(i) for i in ids])) for name, ids in sets.items()}
    if branch:
        edits[f"branch_{branch[0]}"] = zero_branch
    drops: dict[str, list[Tensor]] = {k: [] for k in edits}
    tv: dict[str, list[Tensor]] = {k: [] for k in edits}
    with torch.no_grad():
        for s in range(0, h.shape[0], batch_size):
            hs = h[s:s + batch_size]
            clean = go(hs)
            m0, p0 = animal_mass(clean), clean.softmax(-1)
            for name, edit in edits.items():
                after = go(edit(hs))
                drops[name].append(m0 - animal_mass(after))
                tv[name].append(0.5 * (after.softmax(-1) - p0).abs().sum(1))
    out = {k: torch.cat(v).cpu().numpy() for k, v in drops.items()}
    out.update({f"tv_{k}": torch.cat(v).cpu().numpy() for k, v in tv.items()})
    return out


def matched_controls(target: np.ndarray, candidates: np.ndarray, features: np.ndarray,
                     ) -> np.ndarray:
    """For each target latent, the nearest unused candidate in ``features`` [n, f] (already on
    comparable scales, e.g. log firing rate and log activation mass): a greedy one-to-one match,
    hardest targets (fewest close candidates) first."""
    target, candidates = np.asarray(target), np.asarray(candidates)
    if candidates.size < target.size:
        raise ValueError(f"{candidates.size} candidate latents to match {target.size}")
    dist = np.linalg.norm(features[target][:, None] - features[candidates][None], axis=2)
    free = np.ones(candidates.size, bool)
    chosen = np.empty(target.size, np.int64)
    for t in np.argsort(dist.min(1))[::-1]:
        row = np.where(free, dist[t], np.inf)
        c = int(np.argmin(row))
        chosen[t], free[c] = candidates[c], False
    return chosen


def grouped_bootstrap(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000,
                      seed: int = 0, denom: np.ndarray | None = None,
                      ) -> tuple[float, float, float]:
    """(estimate, 2.5 %, 97.5 %) of the mean of ``values`` — or of the ratio of means
    ``mean(values) / mean(denom)`` — with image groups (an image and its flipped view)
    resampled together."""
    values, groups = np.asarray(values, np.float64), np.asarray(groups)
    below = np.ones_like(values) if denom is None else np.asarray(denom, np.float64)
    uniq, inv = np.unique(groups, return_inverse=True)
    top_sums = np.bincount(inv, values, uniq.size)
    low_sums = np.bincount(inv, below, uniq.size)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, uniq.size, size=(n_boot, uniq.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = top_sums[pick].sum(1) / low_sums[pick].sum(1)
        est = values.sum() / below.sum()
    lo, hi = np.nanquantile(boot, [0.025, 0.975]) if np.isfinite(boot).any() else (np.nan,) * 2
    return float(est), float(lo), float(hi)


def causal_branch_test(go, sae, h: Tensor, groups: np.ndarray, robust: np.ndarray,
                       alive: np.ndarray, firing_rate: np.ndarray, mean_activation: np.ndarray,
                       target_branch: str, other_branches: Sequence[str],
                       branch: tuple[str, slice] | None, *, n_boot: int = 2000,
                       seed: int = 0) -> dict:
    """The causal animal test of one layer: ablate the robust ``target_branch`` latents
    together and, separately, as many robust latents of ``other_branches`` matched on firing
    rate and mean activation; per image the drop in animal mass, 5x5 minus matched, with an
    image-group bootstrap interval; and the latents' share of the whole branch's drop."""
    target = np.flatnonzero(alive & (robust == target_branch))
    others = np.flatnonzero(alive & np.isin(robust, list(other_branches)))
    out = {"latents": int(target.size), "candidates": int(others.size),
           "n_images": int(h.shape[0]), "branch": target_branch}
    why = None
    if target.size < MIN_LATENTS:
        why = f"{target.size} robust {target_branch} latents, fewer than {MIN_LATENTS}"
    elif others.size < MIN_LATENTS:
        why = f"{others.size} robust latents of other branches, fewer than {MIN_LATENTS}"
    elif h.shape[0] < MIN_IMAGES:
        why = f"{h.shape[0]} held-out images, fewer than {MIN_IMAGES}"
    if why:
        return {**out, "testable": False, "why": why}
    if others.size < target.size:  # equal set sizes: a random subset of the targets
        target = np.sort(np.random.default_rng(seed).choice(target, others.size, replace=False))
        out["latents_used"] = int(target.size)
    feats = np.stack([np.log10(np.maximum(firing_rate, 1e-7)),
                      np.log10(np.maximum(mean_activation, 1e-9))], 1)
    feats = (feats - feats[alive].mean(0)) / feats[alive].std(0).clip(1e-9)
    controls = matched_controls(target, others, feats)
    drops = set_ablation_drops(go, sae, h, {"target": target.tolist(),
                                            "matched": controls.tolist()}, branch)
    diff = grouped_bootstrap(drops["target"] - drops["matched"], groups, n_boot, seed)
    res = {**out, "testable": True, "why": None,
           "drop_target": float(drops["target"].mean()),
           "drop_matched": float(drops["matched"].mean()),
           "tv_target": float(drops["tv_target"].mean()),
           "tv_matched": float(drops["tv_matched"].mean()),
           "difference": {"mean": diff[0], "ci_low": diff[1], "ci_high": diff[2]},
           "match": {"firing_rate": [float(np.median(firing_rate[target])),
                                     float(np.median(firing_rate[controls]))],
                     "mean_activation": [float(np.median(mean_activation[target])),
                                         float(np.median(mean_activation[controls]))],
                     "control_branches": {str(k): int(v) for k, v in zip(
                         *np.unique(robust[controls], return_counts=True), strict=True)}},
           "controls": controls.tolist(), "n_boot": n_boot,
           "drop_branch": None, "latent_share_of_branch": None}
    if branch is not None:
        key = f"branch_{branch[0]}"
        b = grouped_bootstrap(drops[key], groups, n_boot, seed)
        res["drop_branch"] = b[0]
        res["drop_branch_ci"] = [b[1], b[2]]
        if b[1] > 0 or b[2] < 0:  # a share of an effect that is there
            share = grouped_bootstrap(drops["target"], groups, n_boot, seed, denom=drops[key])
            res["latent_share_of_branch"] = {"mean": share[0], "ci_low": share[1],
                                             "ci_high": share[2]}
        else:
            res["share_undefined"] = ("the whole branch's own animal-mass effect is not "
                                      "distinguishable from 0")
    return res


def branch_slice(variant, layer: str, branch: str) -> tuple[str, slice] | None:
    """(branch, channel slice) of a block output, or None when the layer has no such branch."""
    sl = branch_slices(variant, layer)
    return (branch, sl[branch]) if branch in sl and len(sl) > 1 else None
