"""Cross-layer consistency: do co-activating latents of two layers sit in the same branch?

Latents of layers A and B are matched one-to-one (mutual best partners) by the correlation of
their activations on the same held-out (image, y, x) samples (rows aligned by store provenance;
needs equal grid sizes). Rare latents correlate by accident, so only latents firing on at least
``min_images`` distinct images take part. The matching itself has a null: the same procedure on
codes whose images are shifted (A on image i against B on another image), which calibrates the
correlation threshold. For matched pairs the dominant branches are compared: contingency table,
agreement rate against a null that shuffles the matching, Cohen's kappa.

:func:`cross_layer` runs all of it for two analysed layers of one store (the analyze stage
calls it per layer pair, after :func:`branchlens.analysis.driver.analyze_layer`); the functions
above it are the parts, on arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from branchlens.analysis.branches import NONE
from branchlens.analysis.config import AnalysisConfig
from branchlens.analysis.stats import agreement_permutation_test, cohen_kappa, contingency


def align_rows(prov_a: np.ndarray, prov_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (ia, ib) with equal (image_index, y, x); first occurrence of each key.

    Positions sampled with replacement repeat; one row per distinct sample position suffices.
    """
    pa, pb = np.asarray(prov_a)[:, :3], np.asarray(prov_b)[:, :3]
    if pa.size == 0 or pb.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    hi = np.maximum(pa.max(0), pb.max(0)) + 1

    def key(p: np.ndarray) -> np.ndarray:
        return (p[:, 0] * hi[1] + p[:, 1]) * hi[2] + p[:, 2]

    ka, ia = np.unique(key(pa), return_index=True)
    kb, ib = np.unique(key(pb), return_index=True)
    _, ja, jb = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    return ia[ja].astype(np.int64), ib[jb].astype(np.int64)


def _moments(z: sp.spmatrix, m: int) -> tuple[np.ndarray, np.ndarray]:
    s1 = np.asarray(z.sum(0)).ravel()
    s2 = np.asarray(z.multiply(z).sum(0)).ravel()
    mu = s1 / max(m, 1)
    return mu, np.sqrt(np.maximum(s2 / max(m, 1) - mu * mu, 0.0))


def mutual_best_matches(za: sp.csr_matrix, zb: sp.csr_matrix,
                        eligible_a: np.ndarray | None = None,
                        eligible_b: np.ndarray | None = None,
                        chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches: A latent a and B latent b where each is the other's best partner.

    ``za`` [M, nA] and ``zb`` [M, nB] are sparse codes on the same M aligned samples (zeros
    count), correlation is Pearson. Mutual best (rather than argmax per A latent) keeps
    near-duplicate latents of one layer from all matching one partner and counting as
    replicates. Returns (ia, ib, corr) sorted by decreasing correlation.
    """
    za, zb = sp.csc_matrix(za, dtype=np.float64), sp.csr_matrix(zb, dtype=np.float64)
    m = za.shape[0]
    na, nb = za.shape[1], zb.shape[1]
    ea = np.ones(na, bool) if eligible_a is None else np.asarray(eligible_a, bool)
    eb = np.ones(nb, bool) if eligible_b is None else np.asarray(eligible_b, bool)
    mu_a, sd_a = _moments(za, m)
    mu_b, sd_b = _moments(zb, m)
    ea, eb = ea & (sd_a > 0), eb & (sd_b > 0)
    best_b = np.full(na, -1, np.int64)
    corr_a = np.full(na, -np.inf)
    best_a = np.full(nb, -1, np.int64)
    corr_b = np.full(nb, -np.inf)
    zbt = zb.T.tocsr()
    cols_all = np.flatnonzero(ea)
    # r = cross/(m·sd_a·sd_b) − (mu_a/sd_a)(mu_b/sd_b), in two in-place passes over each block
    inv_b = torch.from_numpy(np.where(eb, 1 / np.where(sd_b > 0, sd_b, 1.0), 0.0))
    off_b = torch.from_numpy(np.where(eb, mu_b / np.where(sd_b > 0, sd_b, 1.0), 0.0))
    never = torch.from_numpy(~eb)
    if cols_all.size and eb.any():
        for s in range(0, cols_all.size, chunk):
            cols = cols_all[s:s + chunk]
            r = torch.from_numpy((zbt @ za[:, cols]).toarray().T)  # [c, nB] = Σ_rows za·zb
            r.mul_(torch.from_numpy(1 / (m * sd_a[cols]))[:, None]).mul_(inv_b[None, :])
            r.addr_(torch.from_numpy(mu_a[cols] / sd_a[cols]), off_b, alpha=-1)
            r.masked_fill_(never[None, :], -np.inf)
            v, j = r.max(1)
            best_b[cols], corr_a[cols] = j.numpy(), v.numpy()
            v, i = r.max(0)
            better = v.numpy() > corr_b
            best_a[better], corr_b[better] = cols[i.numpy()[better]], v.numpy()[better]
    ia = np.flatnonzero((best_b >= 0) & np.isfinite(corr_a))
    ia = ia[best_a[best_b[ia]] == ia]
    ib, corr = best_b[ia], corr_a[ia]
    order = np.argsort(-corr, kind="stable")
    return ia[order], ib[order], corr[order]


def shifted_rows(prov_a: np.ndarray, prov_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                 groups: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Null alignment: A's samples of image i paired with B's samples of another image i',
    the image ``shift`` places further on in the list of image groups (mirror views stay with
    their image, so a view is never paired with its own mirror).

    Within an image, samples are paired in (y, x) order (the same position when every position
    was harvested). Keeps each layer's codes, firing rates and spatial structure; destroys only
    the co-firing on the same image. ``groups`` [n_images] is each image's group index.
    """
    pa, pb = np.asarray(prov_a)[ia, :3], np.asarray(prov_b)[ib, :3]
    imgs = np.unique(pa[:, 0])
    g = np.asarray(groups)[imgs]
    ug = np.unique(g)
    if ug.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    by_group = {k: imgs[g == k] for k in ug}
    rows_a = _rows_by_image(pa)
    rows_b = _rows_by_image(pb)
    out_a, out_b = [], []
    for gi, k in enumerate(ug):
        other = by_group[ug[(gi + shift) % ug.size]]
        for r, im in enumerate(by_group[k]):
            ra, rb = rows_a[int(im)], rows_b.get(int(other[r % other.size]))
            if rb is None or rb.size == 0:
                continue
            out_a.append(ia[ra])
            out_b.append(ib[rb[np.arange(ra.size) % rb.size]])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_a), np.concatenate(out_b)


def _rows_by_image(p: np.ndarray) -> dict[int, np.ndarray]:
    """Positions into ``p`` of each image's samples, in (y, x) order."""
    order = np.lexsort((p[:, 2], p[:, 1], p[:, 0]))
    imgs, starts = np.unique(p[order, 0], return_index=True)
    ends = np.append(starts[1:], order.size)
    return {int(i): order[s:e] for i, s, e in zip(imgs, starts, ends, strict=True)}


def consistency(dom_a: np.ndarray, dom_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                branches: list[str], *, n_perm: int = 10000, seed: int = 0) -> dict:
    """Dominant-branch agreement of matched pairs (ia[k], ib[k]) against a label-shuffle null.

    Main test on pairs where both latents have a dominant branch; a second table keeps
    "none" as a fifth label. The null shuffles which B latent goes with which A latent,
    keeping both layers' branch distributions and the dependence between latents.
    """
    la, lb = np.asarray(dom_a)[ia], np.asarray(dom_b)[ib]
    both = (la != NONE) & (lb != NONE)
    nb = len(branches)
    table = contingency(la[both], lb[both], nb)
    test = agreement_permutation_test(la[both], lb[both], n_perm=n_perm, seed=seed)
    la5 = np.where(la == NONE, nb, la)
    lb5 = np.where(lb == NONE, nb, lb)
    table5 = contingency(la5, lb5, nb + 1)
    test5 = agreement_permutation_test(la5, lb5, n_perm=n_perm, seed=seed)
    return {
        "matched_pairs": int(ia.size), "pairs_both_dominant": int(both.sum()),
        "labels": list(branches), "table": table.tolist(),
        "kappa": cohen_kappa(table), **{k: v for k, v in test.items() if k != "n_pairs"},
        "with_none": {"labels": [*branches, "none"], "table": table5.tolist(),
                      "kappa": cohen_kappa(table5),
                      **{k: v for k, v in test5.items() if k != "n_pairs"}},
        "per_branch_agreement": {
            b: (float(np.mean(lb[both][la[both] == i] == i)) if np.any(la[both] == i) else None)
            for i, b in enumerate(branches)},
    }


# -- two analysed layers of one store ------------------------------------------------------------

def sparse_codes(sae, arr, rows: np.ndarray, batch: int) -> sp.csr_matrix:
    """SAE codes of the rows ``rows`` of a store array, [len(rows), n_latents] (sparse)."""
    parts = []
    dev = next(sae.parameters()).device
    with torch.no_grad():
        for s in range(0, rows.size, batch):
            x = torch.from_numpy(np.ascontiguousarray(arr[rows[s:s + batch]], np.float32))
            vals, idx = sae.encode_sparse(x.to(dev))
            r = np.repeat(np.arange(x.shape[0]), idx.shape[1])
            parts.append(sp.csr_matrix((vals.cpu().numpy().ravel(),
                                        (r, idx.cpu().numpy().ravel())),
                                       shape=(x.shape[0], sae.cfg.n_latents)))
    return sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, sae.cfg.n_latents))


def layer_grid(store, layer: str, variant: str) -> tuple[int, int] | None:
    """(H, W) of ``layer``'s positions: the store's record, else the network's, else the
    largest stored position."""
    grid = store.manifest.get("widths", {}).get(layer, {}).get("grid")
    if grid:
        return tuple(int(g) for g in grid)
    try:
        from branchlens.model import output_shape

        return tuple(output_shape(variant, layer)[1:])
    except Exception:
        prov = np.asarray(store.provenance(layer))
        return (int(prov[:, 1].max()) + 1, int(prov[:, 2].max()) + 1) if prov.size else None


def cross_layer(a: str, b: str, res: dict, saes: dict, store, cfg: AnalysisConfig,
                groups: np.ndarray, log: Callable[[str], None]) -> dict:
    """One-to-one matching of latents of layers a and b on held-out samples, its shifted-image
    null, and the dominant-branch agreement of the matched pairs against both nulls."""
    variant = saes[a].cfg.variant or store.manifest.get("variant")
    ga, gb = layer_grid(store, a, variant), layer_grid(store, b, variant)
    out: dict[str, Any] = {"layers": [a, b], "grid": [ga, gb]}
    if ga != gb:
        return {**out, "skipped": "different spatial grids; positions cannot be aligned"}
    pa, pb = np.asarray(store.provenance(a)), np.asarray(store.provenance(b))
    ha, hb = res[a]["held_rows"], res[b]["held_rows"]
    la, lb = align_rows(pa[ha], pb[hb])  # positions among each layer's held-out rows
    ia, ib = ha[la], hb[lb]
    out["aligned_samples"] = int(ia.size)
    if ia.size == 0:
        return {**out, "skipped": "no shared held-out (image, y, x) samples in the store"}
    log(f"cross-layer {a} ↔ {b}: {ia.size} aligned held-out samples")
    # the activity pass kept every held-out row's code; else encode the aligned rows again
    za = (res[a]["codes"][la] if res[a].get("codes") is not None
          else sparse_codes(saes[a], store.array(a), ia, cfg.batch_size))
    zb = (res[b]["codes"][lb] if res[b].get("codes") is not None
          else sparse_codes(saes[b], store.array(b), ib, cfg.batch_size))
    ea = res[a]["n_images_fired"] >= cfg.min_images
    eb = res[b]["n_images_fired"] >= cfg.min_images
    ma, mb, corr = mutual_best_matches(za, zb, ea, eb)
    null_pairs = []
    pos_a = {int(r): k for k, r in enumerate(ia)}
    pos_b = {int(r): k for k, r in enumerate(ib)}
    for s in range(1, cfg.match_shifts + 1):
        sa, sb = shifted_rows(pa, pb, ia, ib, groups, s)
        if sa.size == 0:
            continue
        # both are aligned held-out rows already encoded: re-index the codes
        zs_a = za[[pos_a[int(r)] for r in sa]]
        zs_b = zb[[pos_b[int(r)] for r in sb]]
        null_pairs.append(mutual_best_matches(zs_a, zs_b, ea, eb))
    null_corr = [c for _, _, c in null_pairs]
    nc = np.concatenate(null_corr) if null_corr else np.zeros(0)
    q99 = float(np.quantile(nc, 0.99)) if nc.size else None
    threshold = max(cfg.match_threshold, q99 if q99 is not None else cfg.match_threshold)
    keep = corr >= threshold
    null_per_shift = [int(np.sum(c >= threshold)) for c in null_corr]
    n_keep = int(keep.sum())
    out |= {
        "min_images": cfg.min_images,
        "excluded_a_few_images": int((~ea).sum()), "excluded_b_few_images": int((~eb).sum()),
        "eligible_a": int(ea.sum()), "eligible_b": int(eb.sum()),
        "mutual_best_pairs": int(corr.size),
        "threshold": threshold, "threshold_floor": cfg.match_threshold,
        "shifted_image_null": {
            "replicates": len(null_corr), "mutual_best_pairs_mean":
                float(np.mean([c.size for c in null_corr])) if null_corr else None,
            "corr_q99": q99, "pairs_above_threshold_per_replicate": null_per_shift},
        "match_corr_quantiles": ({str(q): float(np.quantile(corr, q))
                                  for q in (0.1, 0.5, 0.9, 0.99)} if corr.size else {}),
        "matches": [[int(x), int(y), float(c)] for x, y, c in
                    zip(ma[keep], mb[keep], corr[keep], strict=True)],
    }
    out["consistency"] = consistency(res[a]["dominant"], res[b]["dominant"], ma[keep], mb[keep],
                                     res[a]["branches"], seed=cfg.seed)
    # Second null for the agreement: the same number of best pairs that the matching finds on
    # shifted images (what the procedure itself, e.g. via firing rates, produces).
    da, db = res[a]["dominant"], res[b]["dominant"]
    obs = _agree_counts(da[ma[keep]], db[mb[keep]])
    null = np.sum([_agree_counts(da[x[:n_keep]], db[y[:n_keep]]) for x, y, _ in null_pairs],
                  axis=0) if null_pairs and n_keep else np.zeros(2, np.int64)
    shifted = {"null_pairs_both_dominant": int(null.sum()),
               "null_agreement": float(null[0] / null.sum()) if null.sum() else None}
    if obs.sum() and null.sum():
        from scipy.stats import fisher_exact

        shifted["p_value"] = float(fisher_exact([[obs[0], obs[1]], [null[0], null[1]]],
                                                alternative="greater")[1])
    out["consistency"]["vs_shifted_image_matching"] = shifted
    return out


def _agree_counts(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """[agree, disagree] among pairs where both latents have a dominant branch."""
    both = (la != NONE) & (lb != NONE)
    agree = int(np.sum(la[both] == lb[both]))
    return np.array([agree, int(both.sum()) - agree], np.int64)
