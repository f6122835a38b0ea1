"""A synthetic run folder in the analysis/SAE artifact formats, at any scale, for the report's
tests and ``benchmarks/report.py``.

Writes what the report reads, in the formats the stages write them: ``sae/<layer>/`` (decoder
weights + cfg.json), ``analysis/latents.csv`` (the analysis' columns), ``summary.json``
(claims, per-layer branch slices, q) and ``embedding_<layer>.npy``. Decoder rows are random,
some planted into one branch; the table's paper ratios are computed from those rows so that
report and table agree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from branchlens.report.geometry import paper_ratios
from branchlens.variants import branch_slices

SIXTEEN_X = {"mixed4a": 8192, "mixed4b": 8192, "mixed4c": 8192, "mixed4d": 8448,
             "mixed4e": 13312}
CATS = ("animal", "dog", "artifact", "food", "other")


def _cfg(layer: str, n: int, d: int, slices: dict) -> dict:
    return {"sae": {"d_in": d, "n_latents": n, "k": 32, "decoder": "untied", "layer": layer,
                    "variant": "bvlc_googlenet", "branch_slices": slices, "scale": 1.0},
            "eval": {"train": {"fvu": 0.2, "l0": 32.0}, "heldout": {"fvu": 0.25, "l0": 32.0},
                     "dead_frac": 0.05}}


def make_run(root: Path, layers: dict[str, int], seed: int = 0, hostile_layer: str | None = None
             ) -> Path:
    """Write a run into ``root``; ``hostile_layer`` renames the first layer in every artifact
    (a layer name carrying markup, as a careless config could)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    run = root
    (run / "analysis").mkdir(parents=True, exist_ok=True)
    per_layer, names = {}, []
    rows_out: list[list] = []
    head: list[str] | None = None
    for li, (layer, n) in enumerate(layers.items()):
        name = hostile_layer if (hostile_layer and li == 0) else layer
        names.append(name)
        sl = {b: [s.start, s.stop] for b, s in branch_slices("bvlc_googlenet", layer).items()}
        branches = list(sl)
        d = max(b for _, b in sl.values())
        dec = rng.standard_normal((n, d)).astype(np.float32)
        planted = rng.random(n) < 0.2
        which = rng.integers(0, len(branches), n)
        for i in np.flatnonzero(planted):  # mostly inside one branch
            a, b = sl[branches[which[i]]]
            dec[i] *= 0.05
            dec[i, a:b] = np.abs(dec[i, a:b]) * 3
        dec /= np.linalg.norm(dec, axis=1, keepdims=True)
        sdir = run / "sae" / name
        sdir.mkdir(parents=True, exist_ok=True)
        cfg = _cfg(name, n, d, sl)
        save_file({"W_dec": dec, "W_enc": dec.copy()}, str(sdir / "weights.safetensors"),
                  metadata={"cfg": json.dumps(cfg)})
        (sdir / "cfg.json").write_text(json.dumps(cfg))
        alive = rng.random(n) > 0.05
        dead = ~alive & (rng.random(n) < 0.5)
        pr = paper_ratios(dec, sl)
        p_raw = np.where(planted[:, None] & (np.arange(len(branches)) == which[:, None]),
                         rng.random((n, len(branches))) * 1e-4, rng.random((n, len(branches))))
        q_raw = np.minimum(1.0, p_raw * 20)
        p_scale = np.minimum(1.0, p_raw * rng.uniform(1, 50, (n, 1)))
        q_scale = np.minimum(1.0, p_scale * 20)
        rate = rng.exponential(0.01, n) * alive
        dom = np.where(alive & planted, which, -1)
        rdom = np.where((dom >= 0) & (q_scale.min(1) < 0.05), dom, -1)
        emb = rng.standard_normal((n, 2)).astype(np.float32) + 4 * np.stack(
            [np.cos(which * 1.6), np.sin(which * 1.6)], 1) * planted[:, None]
        emb[~alive] = np.nan
        np.save(run / "analysis" / f"embedding_{name}.npy", emb)
        head = ["layer", "latent", "alive", "dead_in_training", "firing_rate",
                "mean_activation", "mean_when_active", "n_images_fired", "dominant",
                "robust_dominant", "d_eff"]
        for b in branches:
            head += [f"{p}_{b}" for p in ("paper_ratio", "full_ratio", "paper_ratio_std",
                                          "full_ratio_std", "enrichment", "enrichment_dict",
                                          "p_raw", "q_raw", "p_scale", "q_scale", "p_paper",
                                          "p_beta", "p_isotropic", "attribution")]
        head += ["top_category", "animal_fraction", "dog_fraction", "top_images", "top_labels"]
        for i in range(n):
            r = [name, i, bool(alive[i]), bool(dead[i]), f"{rate[i]:.6g}",
                 f"{rate[i] * 2:.4g}", f"{rng.random():.4g}", int(rate[i] * 5000),
                 branches[dom[i]] if dom[i] >= 0 else "none",
                 branches[rdom[i]] if rdom[i] >= 0 else "none", f"{rng.uniform(5, 80):.4g}"]
            for bi in range(len(branches)):
                p, q = (f"{p_raw[i, bi]:.4g}", f"{q_raw[i, bi]:.4g}") if alive[i] else ("", "")
                ps, qs = (f"{p_scale[i, bi]:.4g}", f"{q_scale[i, bi]:.4g}") if alive[i] \
                    else ("", "")
                v = f"{pr[i, bi]:.6g}"
                r += [v, v, v, v, "1.0", "1.0", p, q, ps, qs, p, p, p, "0.1"]
            cat = CATS[i % len(CATS)] if alive[i] else ""
            r += [cat, f"{rng.random():.3g}", f"{rng.random():.3g}",
                  ";".join(f"n0000{k}_{i % 97}.JPEG" for k in range(3)), "1;2;3"]
            rows_out.append(r)
        per_layer[name] = {"branch_slices": sl, "latents": n, "tested": int(alive.sum()),
                           "embedding": {"method": "pca", "n_points": int(alive.sum())},
                           "branches": [{"branch": b, "width": sl[b][1] - sl[b][0]}
                                        for b in branches]}
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(rows_out)
    summary = {"layers": names, "config": {"q": 0.05}, "per_layer": per_layer,
               "claims": [{"id": "c1", "claim": "5x5 latents prefer animals",
                           "verdict": "not supported", "evidence": "synthetic",
                           "rule": "BH q=0.05"}]}
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    return run
