"""Does a verdict survive another SAE? Latent matching across replicates, label replication,
near-duplicate latents and per-claim agreement — pure functions over decoders and summaries.

Every number of a run is conditional on one dictionary trained once. Replicates (the same
settings, other seeds: other initialisation, batch order and held-out images) answer which
latents, labels and verdicts are properties of the layer rather than of one training run.
Latents are matched by the cosine of their decoder directions (unit rows), the usual
criterion for "the same feature" across SAEs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

MATCH_COS = 0.7  # a latent "exists" in another replicate when its best decoder cosine is ≥ this
DUPLICATE_COS = 0.9  # two latents of one SAE this close are near-duplicates


def _unit(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, np.float32))
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def best_matches(a, b, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a`` [n, d], the row of ``b`` [m, d] with the largest cosine, and it."""
    ua, ub = _unit(a), _unit(b)
    idx = np.empty(ua.shape[0], np.int64)
    cos = np.empty(ua.shape[0], np.float32)
    for s in range(0, ua.shape[0], chunk):
        c = ua[s:s + chunk] @ ub.T
        v, i = c.max(1)
        idx[s:s + chunk], cos[s:s + chunk] = i.numpy(), v.numpy()
    return idx, cos


def near_duplicates(dec, threshold: float = DUPLICATE_COS, chunk: int = 4096) -> int:
    """Latents of one SAE with another latent of it at decoder cosine ≥ ``threshold``."""
    u = _unit(dec)
    has = np.zeros(u.shape[0], bool)
    for s in range(0, u.shape[0], chunk):
        c = u[s:s + chunk] @ u.T
        rows = torch.arange(c.shape[0])
        c[rows, rows + s] = -1  # not itself
        has[s:s + chunk] = (c >= threshold).any(1).numpy()
    return int(has.sum())


def label_replication(labels: np.ndarray, other: np.ndarray, match: np.ndarray,
                      cos: np.ndarray, branches: list[str], alive: np.ndarray | None = None,
                      threshold: float = MATCH_COS) -> dict:
    """Per branch, of the latents labelled with it (robust dominant index, −1 = none): how many
    have a match in the other replicate (cosine ≥ ``threshold``) and how many of those carry the
    same label there. ``alive`` limits the count to tested latents."""
    labels, other = np.asarray(labels), np.asarray(other)
    ok = np.ones(labels.size, bool) if alive is None else np.asarray(alive, bool)
    found = ok & (cos >= threshold)
    same = found & (other[match] == labels)
    out: dict = {"threshold": threshold, "latents": int(ok.sum()), "matched": int(found.sum()),
                 "matched_fraction": float(found.sum() / max(ok.sum(), 1)),
                 "median_best_cos": float(np.median(cos[ok])) if ok.any() else None,
                 "per_branch": {}}
    for i, b in enumerate([*branches, "none"]):
        code = i if b != "none" else -1
        mine = ok & (labels == code)
        k, m = int((same & mine).sum()), int((found & mine).sum())
        out["per_branch"][b] = {"latents": int(mine.sum()), "matched": m, "same_label": k,
                                "same_label_fraction": k / m if m else None}
    lab = ok & (labels >= 0)
    k, m = int((same & lab).sum()), int((found & lab).sum())
    out["labelled"] = {"latents": int(lab.sum()), "matched": m, "same_label": k,
                       "same_label_fraction": k / m if m else None}
    return out


def claim_stability(main: list[dict], replicates: list[list[dict]], layers: list[str]) -> dict:
    """Per claim id: the verdict of the main SAEs and of every replicate, each decided on the
    same ``layers``, and how many agree with the main one."""
    out = {}
    for c in main:
        if c["verdict"] == "not run":  # a stage that has not run says nothing to compare
            continue
        verdicts = [c["verdict"]] + [next((r["verdict"] for r in rep if r["id"] == c["id"]),
                                          "missing") for rep in replicates]
        agree = sum(v == verdicts[0] for v in verdicts)
        counts = Counter(verdicts)
        out[c["id"]] = {"layers": layers, "replicates": len(verdicts), "verdicts": verdicts,
                        "agree": agree, "stable": agree == len(verdicts),
                        "summary": (f"{agree}/{len(verdicts)} SAE seeds agree on "
                                    f"{', '.join(layers)}" if agree == len(verdicts) else
                                    f"does not replicate: {dict(counts)} over "
                                    f"{len(verdicts)} SAE seeds on {', '.join(layers)}")}
    return out
