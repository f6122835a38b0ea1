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


def smooth_image(rng: np.random.Generator, size: int = 224):
    """A [3, size, size] image in [0, 1] without fine detail (resampling it anywhere gives the
    same picture), as a torch tensor."""
    import torch
    import torch.nn.functional as F

    small = torch.from_numpy(rng.random((1, 3, 6, 6)).astype(np.float32))
    return F.interpolate(small, size=(size, size), mode="bicubic",
                         align_corners=False)[0].clamp(0, 1)


def add_gallery(run: Path, layers: list[str] | None = None, n_images: int = 200,
                size: int = 12, seed: int = 0, ids: dict[int, str] | None = None) -> dict:
    """Galleries as the examples stage writes them (the stage's own ``GalleryWriter``), from
    smooth synthetic images: latent j's slot s shows image ``images[j, s]`` (distinct images per
    latent, labels ``i % 1000``), and its map there is a bump at the recorded unit
    (``ys, xs``) of height ``values[j, s]``, zero below a fifth of it (sparse, like TopK codes).
    ``ids`` overrides image ids. Returns {layer: Gallery}."""
    import torch

    from branchlens.model import output_shape
    from branchlens.viz.receptive import receptive_field
    from branchlens.viz.sprites import Gallery, GalleryWriter

    rng = np.random.default_rng(seed)
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    pictures = [smooth_image(rng) for _ in range(n_images)]
    out = {}
    for layer in layers or summary["layers"]:
        n = summary["per_layer"][layer]["latents"]
        _, h, w = output_shape("bvlc_googlenet", layer)
        k = min(size, n_images)
        images = torch.from_numpy(np.argsort(rng.random((n, n_images)), 1)[:, :k].copy())
        values = torch.from_numpy(-np.sort(-rng.exponential(1.0, (n, k)), 1).astype(np.float32)
                                  + 0.1)
        ys = torch.from_numpy(rng.integers(0, h, (n, k)))
        xs = torch.from_numpy(rng.integers(0, w, (n, k)))
        g = Gallery(layer, images, ys, xs, values)
        writer = GalleryWriter(run / "viz" / "examples" / layer, g,
                               receptive_field("bvlc_googlenet", layer), (h, w), 224)
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for i in range(n_images):
            slots = writer.owed.get(i, [])
            maps = torch.zeros(n, h, w)
            if slots:
                js = torch.tensor([j for j, _ in slots])
                ss = torch.tensor([s for _, s in slots])
                d2 = ((gy[None] - ys[js, ss][:, None, None]) ** 2
                      + (gx[None] - xs[js, ss][:, None, None]) ** 2).float()
                bump = values[js, ss][:, None, None] * torch.exp(-d2 / 2.0)
                maps[js] = torch.where(bump >= 0.2 * values[js, ss][:, None, None], bump, 0.0)
            name = (ids or {}).get(i, f"n{i % 1000:08d}_{i}.JPEG")
            writer.add(i, pictures[i], name, i % 1000, maps)
        writer.finish(n_images)
        out[layer] = g
    return out


def add_sprites(run: Path, tiles: int = 6, px: int = 40, per_sheet: int = 256,
                seed: int = 0) -> None:
    """Sprite sheets and top tables as the examples stage of earlier versions wrote them
    (smooth random crops): runs made then still show their crops."""
    from PIL import Image
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    for layer in summary["layers"]:
        n = summary["per_layer"][layer]["latents"]
        d = run / "viz" / "examples" / layer
        d.mkdir(parents=True, exist_ok=True)
        values = np.sort(rng.exponential(1.0, (n, 16)).astype(np.float32), 1)[:, ::-1].copy()
        images = rng.integers(0, 1000, (n, 16)).astype(np.int64)
        ys, xs = rng.integers(0, 14, (2, n, 16)).astype(np.int64)
        ids = [f"n{i:08d}_{i}.JPEG" for i in range(1000)]
        save_file({"values": values, "images": images, "ys": ys, "xs": xs},
                  str(d / "top.safetensors"),
                  metadata={"layer": json.dumps(layer), "grid": "[14, 14]",
                            "n_images": "1000", "image_ids": json.dumps(ids)})
        sheets = []
        for s0 in range(0, n, per_sheet):
            rows = min(per_sheet, n - s0)
            small = rng.integers(0, 255, (rows * 4, tiles * 4, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((tiles * px, rows * px), Image.BILINEAR)
            name = f"sprites_{s0 // per_sheet:03d}.jpg"
            img.save(d / name, format="JPEG", quality=82)
            sheets.append(name)
        (d / "sprites.json").write_text(json.dumps(
            {"layer": layer, "tile": px, "n_tiles": tiles, "per_sheet": per_sheet,
             "sheets": sheets, "n_latents": n, "with_examples": n}))
