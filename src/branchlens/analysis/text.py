"""The analysis as plain text: the claims and the layer × branch table ``branchlens analyze``
prints, and the caveat on p-values that the summary and the printout both carry.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PVALUE_NOTE = ("p-values are per latent; latents are not independent (they share images and "
               "directions), so BH counts and per-latent p-values are approximate. The "
               "cross-layer and category tests use nulls that keep that dependence (shuffled "
               "matching, shifted images, image-cluster bootstrap).")


def format_table(summary: dict) -> str:
    """Plain-text claims and layer × branch table for the CLI."""
    lines = ["claims of the paper:"]
    for c in summary.get("claims", []):
        lines.append(f"  [{c['verdict']}] {c['claim']} — {c['evidence']}")
    head = (f"{'layer':<9}{'branch':<6}{'w':>5}{'share':>7}{'tested':>7}{'raw':>6}{'scale':>6}"
            f"{'robust':>7}{'byscale':>8}{'dom':>6}{'rdom':>6}{'dom/share':>10}{'naive':>7}"
            f"{'ctl-raw':>8}{'ctl-scl':>8}{'iso-ref':>8}")
    lines += ["", head, "-" * len(head)]
    for layer, s in summary["per_layer"].items():
        for r in s["branches"]:
            lines.append(
                f"{layer:<9}{r['branch']:<6}{r['width']:>5}{r['channel_share']:>7.3f}"
                f"{r['tested']:>7}{r['significant']:>6}{_dash(r['significant_scale']):>6}"
                f"{r['robust']:>7}{_dash(r['explained_by_scale']):>8}{r['dominant']:>6}"
                f"{r['robust_dominant']:>6}{r['dominant_enrichment_vs_channel_share']:>10.2f}"
                f"{r['naive_argmax_paper_ratio']:>7}"
                f"{_dash(r.get('control_raw_rule_null_draws')):>8}"
                f"{_dash(r.get('control_scale_rule_scaled_gaussian')):>8}"
                f"{r['significant_isotropic_reference']:>8}")
        if s.get("warning"):
            lines.append(f"  WARNING {layer}: {s['warning']}")
    lines.append("raw: BH-significant (q per branch) on the raw decoder vs channel permutation; "
                 "scale: vs permutation within activation-std strata; robust: both; byscale: "
                 "raw only (explained by channel scale); dom/rdom: dominant / robust-dominant "
                 "latents; naive: argmax paper ratio; ctl-raw: raw rule on draws from its own "
                 "null; ctl-scl: scale rule on σ-scaled random directions; iso-ref: isotropic "
                 "Beta (reference only). Dead and never-firing latents are not tested.")
    lines.append(PVALUE_NOTE)
    for c in summary["cross_layer"]:
        cc = c.get("consistency")
        if cc is None:
            lines.append(f"{c['layers'][0]}↔{c['layers'][1]}: skipped ({c.get('skipped')})")
            continue
        lines.append(
            f"{c['layers'][0]}↔{c['layers'][1]}: mutual pairs≥{c['threshold']:.2f}="
            f"{cc['matched_pairs']} (shifted-image null: "
            f"{c['shifted_image_null']['pairs_above_threshold_per_replicate']}) "
            f"both-dominant={cc['pairs_both_dominant']} agreement={_num(cc['agreement'])} "
            f"null={_num(cc['null_mean'])} kappa={_num(cc['kappa'])} p={_num(cc['p_value'])}")
    return "\n".join(lines)


def _dash(x: Any) -> str:
    return "-" if x is None else str(x)


def _num(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3g}"
