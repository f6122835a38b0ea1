"""The overview sections of the report, each a function ``ReportContext -> HTML string``.

Every value that reaches the page goes through :func:`esc` (labels, image ids and file names
come from user data). A section whose artifacts are missing renders a one-line note naming the
command that produces them, so a partial run still gets a complete page.
"""

from __future__ import annotations

import json
from typing import Any

# shell_command moved to report.builder (it sits below the sections); still importable from here
from branchlens.report.builder import ReportContext, find_key, shell_command  # noqa: F401
from branchlens.report.images import figure_src, image_src, sparkline
from branchlens.report.markup import branch_tag, esc, figure, fmt, json_details, kv, na, table


# ---------------------------------------------------------------------------------------------
def data_section(ctx: ReportContext) -> str:
    """Image source, counts and skipped files from the store manifest (run.json as fallback)."""
    m = ctx.manifest
    if not isinstance(m, dict):
        src = find_key(ctx.run, "source")
        extra = f"<p>source (run.json): {esc(json.dumps(src))}</p>" if src else ""
        return extra + na("activation store", "harvest", ctx)
    src = m.get("source") if isinstance(m.get("source"), dict) else {"description": m.get("source")}
    counts = m.get("counts") or {}
    skips = m.get("skips") or {}
    sampling = m.get("sampling") or {}
    pairs = [
        ("source", esc(src.get("description"))),
        ("images", fmt(counts.get("images", src.get("n_images")))),
        ("images stored", fmt(counts.get("images_stored"))),
        ("images skipped", fmt(counts.get("images_skipped"))),
        ("input size", fmt(src.get("input_size"))),
        ("paper-compat input scaling", esc(src.get("paper_compat"))),
        ("sampling", esc(", ".join(f"{k}={v}" for k, v in sampling.items()
                                   if k in ("method", "samples_per_image", "aligned", "seed")))),
        ("dtype", esc(m.get("dtype"))),
    ]
    vec = counts.get("vectors") or {}
    rows = [(esc(layer), fmt(n), fmt(find_key((m.get("widths") or {}).get(layer), "channels")))
            for layer, n in vec.items()]
    skip_rows = [(esc(reason), fmt(n), esc(", ".join(map(str, (skips.get("examples") or {})
                                                          .get(reason, [])))))
                 for reason, n in (skips.get("counts") or {}).items()]
    out = kv(pairs)
    if rows:
        out += "<h3>Stored vectors</h3>" + table(["layer", "vectors", "channels"], rows)
    if skip_rows:
        out += "<h3>Skipped files</h3>" + table(["reason", "images", "examples"], skip_rows)
    return out + json_details("store manifest (JSON)", {k: v for k, v in m.items()
                                                        if k != "shards"})


def sae_section(ctx: ReportContext) -> str:
    """Per-layer SAE quality: FVU (train and held-out images), L0, dead fraction, curves."""
    if not ctx.saes:
        return na("trained SAEs", "train", ctx)
    rows, curves = [], []
    for layer, s in ctx.saes.items():
        cfg, ev, tr = s.sae, s.evals, s.cfg.get("train") or {}
        train, held = ev.get("train") or {}, ev.get("heldout") or {}
        fvu_t, fvu_h = train.get("fvu"), held.get("fvu")
        flag = ""
        if isinstance(fvu_t, float) and isinstance(fvu_h, float) and fvu_h > 1.25 * fvu_t:
            flag = ' <span class="flag" title="held-out FVU well above training FVU">overfit</span>'
        rows.append((esc(layer), fmt(cfg.get("d_in")), fmt(cfg.get("n_latents")),
                     fmt(cfg.get("k")), esc(cfg.get("decoder")),
                     f"{fmt(tr.get('step'))} / {fmt(tr.get('total_steps'))}",
                     fmt(fvu_t), fmt(fvu_h) + flag, fmt(train.get("l0")), fmt(held.get("l0")),
                     fmt(ev.get("dead_frac")),
                     f"{fmt(s.cfg.get('train_images'))} / {fmt(s.cfg.get('heldout_images'))}"))
        if s.curves is not None:
            curves.append(figure(image_src(ctx, s.curves), f"{layer} training curves",
                                 f"{layer}: training curves"))
        elif s.metrics:
            log = [m for m in s.metrics if "step" in m and not m.get("final")]
            xs = [m["step"] for m in log]
            spark = "".join(sparkline(xs, [m.get(k) for m in log], f"{layer} {k}", log=lg)
                            for k, lg in (("fvu", True), ("l0", False), ("dead_frac", False)))
            curves.append(f'<div class="sparks">{spark}</div>')
    head = ["layer", "d_in", "latents", "k", "decoder", "steps", "FVU (train)",
            "FVU (held-out images)", "L0 (train)", "L0 (held-out)", "dead fraction",
            "images train / held-out"]
    note = ('<p class="note">FVU = reconstruction MSE / variance. Held-out FVU is measured on '
            "images never seen in training; a clearly higher value means the SAE overfits.</p>")
    return table(head, rows) + note + '<div class="figs">' + "".join(curves) + "</div>"


def specialization_section(ctx: ReportContext) -> str:
    """Layer × branch table: discoveries per decision rule against the null controls."""
    per = (ctx.summary or {}).get("per_layer")
    if not per:
        return na("branch analysis", "analyze", ctx)
    head = ["layer", "branch", "width", "channel share", "tested", "significant (raw)",
            "E[false +]", "significant (scale)", "robust", "explained by scale",
            "control: raw null draws", "control: same permutation", "control: scale null draws",
            "control: σ-scaled random (scale rule)", "σ-scaled random through raw (ref.)",
            "dominant", "robust dominant", "dominant / share", "naive argmax", "isotropic ref.",
            "paper-ratio test"]
    rows, facts, warnings = [], [], []
    for layer, s in per.items():
        for r in s.get("branches") or []:
            rows.append((esc(layer), branch_tag(r.get("branch")), fmt(r.get("width")),
                         fmt(r.get("channel_share")), fmt(r.get("tested")),
                         fmt(r.get("significant")), fmt(r.get("expected_false_positives")),
                         fmt(r.get("significant_scale")), fmt(r.get("robust")),
                         fmt(r.get("explained_by_scale")),
                         fmt(r.get("control_raw_rule_null_draws")),
                         fmt(r.get("control_raw_rule_same_permutation")),
                         fmt(r.get("control_scale_rule_null_draws")),
                         fmt(r.get("control_scale_rule_scaled_gaussian")),
                         fmt(r.get("control_raw_rule_scaled_gaussian")),
                         fmt(r.get("dominant")), fmt(r.get("robust_dominant")),
                         fmt(r.get("dominant_enrichment_vs_channel_share")),
                         fmt(r.get("naive_argmax_paper_ratio")),
                         fmt(r.get("significant_isotropic_reference")),
                         fmt(r.get("significant_paper_ratio"))))
        knn = s.get("knn_branch_agreement") or {}
        beta = s.get("beta_approximation_vs_monte_carlo_tail") or {}
        perm = s.get("permutations") or {}
        facts.append((esc(layer), fmt(s.get("latents")), fmt(s.get("dead_in_training")),
                      fmt(s.get("never_fired_heldout")), fmt(s.get("tested")), fmt(s.get("q")),
                      f"{fmt(perm.get('mean'))} / {fmt(perm.get('max'))}",
                      f"{fmt(beta.get('median_abs_log10_diff'))} (n={fmt(beta.get('n'))})",
                      fmt(s.get("median_effective_dimension")), fmt(knn.get("ratio")),
                      esc(s.get("data_split"))))
        if s.get("warning"):
            warnings.append(f'<p class="warn">{esc(layer)}: {esc(s["warning"])}</p>')
    note = (ctx.summary or {}).get("pvalue_note")
    return ("".join(warnings) + table(head, rows, "spec")
            + f'<p class="note">{esc(SPEC_NOTE)}</p>' + "<h3>Per layer</h3>" +
            table(["layer", "latents", "dead in training", "never fire on held-out", "tested",
                   "q", "permutations mean / max", "Beta vs MC in the tail (median |Δlog10 p|)",
                   "median d_eff", "kNN branch agreement / chance", "data side uses"], facts)
            + (f'<p class="note">{esc(note)}</p>' if note else "") + controls_tables(per))


def _calib(c: dict | None, level: str) -> str:
    cell = ((c or {}).get(level) or {}).get("all") or {}
    if cell.get("rate") is None:
        return "—"
    return f"{fmt(cell['rate'])} (≤ {fmt(cell['upper'])}{'' if cell['ok'] else ' ✗'})"


def controls_tables(per: dict) -> str:
    """The controls that can fail: relabelling null, calibration, power, the data baseline."""
    layers, cells = [], []
    for layer, s in per.items():
        rel = s.get("relabelling_null") or {}
        sig = ((s.get("null_controls") or {}).get("scale_rule_scaled_gaussian") or {})
        fams = (s.get("data_baseline") or {}).get("families") or {}
        gauss, pcs = fams.get("covariance_gaussian") or {}, fams.get("principal") or {}
        sae = (s.get("data_baseline") or {}).get("sae") or {}
        vs = gauss.get("sae_minus_data") or {}
        ci = vs.get("ci")
        if not rel and not fams:
            continue
        layers.append((
            esc(layer), f"{fmt(rel.get('observed'))} vs {fmt(rel.get('null_mean'))} "
            f"(max {fmt(rel.get('null_max'))}, p={fmt(rel.get('p_value'))})",
            _calib(sig.get("calibration"), "0.05"), _calib(sig.get("calibration"), "0.001"),
            f"{fmt(sae.get('robust_any'))} / {fmt(sae.get('directions'))}",
            f"{fmt(gauss.get('robust_any'))} / {fmt(gauss.get('directions'))}",
            (f"{fmt(vs.get('difference'))} [{fmt(ci[0])}, {fmt(ci[1])}] p={fmt(vs.get('p_value'))}"
             if ci else "—"),
            f"{fmt(pcs.get('robust_any'))} / {fmt(pcs.get('directions'))}"))
        power = (s.get("power") or {}).get("branches") or {}
        for b, pw in power.items():
            rb = (rel.get("per_branch") or {}).get(b) or {}
            by = pw.get("power_scale_by_boost") or {}
            cells.append((
                esc(layer), branch_tag(b),
                f"{fmt(rb.get('observed'))} vs {fmt(rb.get('null_mean'))}"
                + (f" (p={fmt(rb['p_value'])})" if rb.get("p_value") is not None else ""),
                " / ".join(f"×{k}: {fmt(v)}" for k, v in by.items()),
                "yes" if pw.get("testable_for_scale") else "no (blind)",
                fmt(pw.get("cutoff")), fmt(pw.get("strata_alone")),
                fmt(pw.get("share_in_shared_strata")),
                f"{fmt((sae.get('per_branch') or {}).get(b))} vs "
                f"{fmt((gauss.get('per_branch') or {}).get(b))} / "
                f"{fmt((pcs.get('per_branch') or {}).get(b))}"))
    if not layers:
        return ""
    return ("<h3>Controls that can fail</h3>" + table(
        ["layer", "relabelling null: robust hits, real vs random partitions",
         "scale rule on σ-scaled random: p<0.05 rate", "p<0.001 rate",
         "SAE latents robust", "covariance draws robust", "SAE − data (95% CI)",
         "principal directions robust"], layers) + table(
        ["layer", "branch", "relabelling: real vs random", "scale-rule power by boost",
         "testable for scale", "BH cut-off", "strata it fills alone",
         "share in shared strata", "robust: SAE vs covariance / principal"], cells)
        + f'<p class="note">{esc(CONTROLS_NOTE)}</p>')


CONTROLS_NOTE = (
    "Relabelling null: robust (p ≤ α under both rules) (latent, branch) hits with the real "
    "branch partition vs random partitions of the same widths, the whole rule re-run each time; "
    "it keeps the dependence between latents. Calibration: the scale rule's rate of small "
    "p-values on σ-scaled random directions (pure channel scale) against the binomial bound "
    "(✗: above it). Power: planted latents at this layer's σ with one branch boosted, at the BH "
    "cut-off the layer used; below 0.5 a branch is not testable for scale (a branch that fills "
    "whole std strata cannot lose its mass under within-stratum permutations). Data baseline: "
    "directions drawn from the layer's activation covariance, and its principal directions, "
    "through the same rules (BH within each family of the same size as the SAE sample).")


SPEC_NOTE = (
    "Dead and never-firing latents are not tested. significant (raw): BH at q per branch over "
    "tested latents, channel-permutation null on the decoder in activation units (the paper's "
    "definition; the primary decision); significant (scale): values permuted only among "
    "channels of equal activation std, i.e. beyond what channel scale alone gives a branch; "
    "robust: both; explained by scale: raw only. Monte-Carlo p-values are refined until BH can "
    "decide (no p-value floor). Controls run each rule on directions drawn from its own null "
    "(discoveries should stay ≤ q × tested); the σ-scaled random directions through the raw "
    "rule show how much pure channel scale the raw rule calls specialised. dominant / share: "
    "dominant latents as a fraction of tested ones, divided by the branch's channel share. "
    "isotropic ref.: the miscalibrated Beta null, for reference only. paper-ratio test: the "
    "positive-part statistic against its own permutation null, a reference (refined to at most "
    "32 000 permutations, so BH counts of a handful per branch may be missed).")


def _analysis_figure(ctx: ReportContext, layer: str, prefix: str) -> str | None:
    """A figure of ``layer`` by name in RUN/analysis (paths in summary.json may be stale)."""
    adir = ctx.layout.analysis_dir
    per = ((ctx.summary or {}).get("per_layer") or {}).get(layer) or {}
    names = [f.rsplit("/", 1)[-1] for f in per.get("figures") or [] if isinstance(f, str)]
    stems = [n.rsplit(".", 1)[0] for n in names if n.startswith(prefix)]
    for stem in [*stems, f"{prefix}_{layer}"]:
        uri = figure_src(ctx, adir / stem)
        if uri:
            return uri
    return None


def curves_section(ctx: ReportContext) -> str:
    """The paper's sorted-ratio curves per layer, with the channel-permutation null band."""
    if not ctx.summary:
        return na("sorted-ratio curves", "analyze", ctx)
    figs = [figure(_analysis_figure(ctx, layer, "ratio_curves"), f"{layer} sorted ratio curves",
                   f"{layer}: sorted paper ratio ‖relu(v_b)‖/‖relu(v)‖ per branch; grey band: "
                   "channel-permutation null (5–95 %)")
            for layer in ctx.summary.get("layers") or []]
    rows = []
    for layer, s in (ctx.summary.get("per_layer") or {}).items():
        pc = s.get("paper_curve") or {}
        for scale in ("raw", "std"):
            for b, r in (pc.get(scale) or {}).items():
                rows.append((esc(layer), esc(scale), branch_tag(b), fmt(r.get("median")),
                             f"{fmt(r.get('null_median_mean'))} [{fmt(r.get('null_median_q05'))},"
                             f" {fmt(r.get('null_median_q95'))}]", fmt(r.get("isotropic_ratio")),
                             fmt(r.get("count_gt_0.5")),
                             f"{fmt(r.get('null_count_gt_0.5_mean'))} "
                             f"(p {fmt(r.get('p_count_gt_0.5'), 2)})",
                             fmt(r.get("count_gt_0.9")),
                             f"{fmt(r.get('null_count_gt_0.9_mean'))} [≤ "
                             f"{fmt(r.get('null_count_gt_0.9_q95'))}] "
                             f"(p {fmt(r.get('p_count_gt_0.9'), 2)})"))
    tab = (table(["layer", "decoder", "branch", "median ratio", "null median [5 %, 95 %]",
                  "√(w/d)", "ratio > 0.5", "null (p)", "ratio > 0.9", "null [95 %] (p)"], rows)
           + '<p class="note">The paper\'s metric on its own terms: the positive-part ratio of '
             "alive latents against its channel-permutation null (replicates permute every "
             "latent independently); std: the decoder divided by each channel's activation "
             "std.</p>") if rows else ""
    return tab + '<div class="figs wide">' + "".join(figs) + "</div>"


def crosslayer_section(ctx: ReportContext) -> str:
    """Dominant-branch agreement of co-activating latents in pairs of layers."""
    cross = (ctx.summary or {}).get("cross_layer")
    if ctx.summary is None:
        return na("cross-layer analysis", "analyze", ctx)
    if not cross:
        return '<p class="na">no layer pairs: the analysis covered fewer than two layers</p>'
    out = []
    for c in cross:
        pair = " ↔ ".join(map(str, c.get("layers") or ["?", "?"]))
        cc = c.get("consistency")
        if not isinstance(cc, dict):
            out.append(f"<h3>{esc(pair)}</h3><p class='na'>skipped: {esc(c.get('skipped'))}</p>")
            continue
        null = c.get("shifted_image_null") or {}
        stats = [("aligned held-out samples", fmt(c.get("aligned_samples"))),
                 ("mutual-best pairs (all)", fmt(c.get("mutual_best_pairs"))),
                 ("matched pairs (corr ≥ threshold)",
                  f"{fmt(cc.get('matched_pairs'))} (threshold {fmt(c.get('threshold'))}: "
                  f"max of {fmt(c.get('threshold_floor'))} and the shifted-image null's 99th "
                  "percentile)"),
                 ("same procedure on shifted images (pairs ≥ threshold)",
                  esc(null.get("pairs_above_threshold_per_replicate"))),
                 ("pairs with both dominant", fmt(cc.get("pairs_both_dominant"))),
                 ("agreement", fmt(cc.get("agreement"))),
                 ("shuffle null mean [5 %, 95 %]",
                  f"{fmt(cc.get('null_mean'))} [{fmt(cc.get('null_q05'))}, "
                  f"{fmt(cc.get('null_q95'))}]"),
                 ("Cohen's κ", fmt(cc.get("kappa"))), ("p-value", fmt(cc.get("p_value"))),
                 ("agreement of the shifted-image matching (p, Fisher)",
                  f"{fmt((cc.get('vs_shifted_image_matching') or {}).get('null_agreement'))} "
                  f"(p {fmt((cc.get('vs_shifted_image_matching') or {}).get('p_value'))})"),
                 (f"excluded (< {c.get('min_images')} firing images)",
                  f"{fmt(c.get('excluded_a_few_images'))} / {fmt(c.get('excluded_b_few_images'))}")]
        per = cc.get("per_branch_agreement") or {}
        if per:
            stats.append(("agreement per branch", esc(", ".join(
                f"{b}: {'—' if v is None else f'{v:.2f}'}" for b, v in per.items()))))
        out.append(f"<h3>{esc(pair)}</h3><div class='row'>{kv(stats)}"
                   f"{contingency(cc.get('labels') or [], cc.get('table') or [], c)}</div>")
        wn = cc.get("with_none") or {}
        if wn.get("table"):
            out.append("<details><summary>with “none” as a fifth label (κ "
                       f"{fmt(wn.get('kappa'))}, p {fmt(wn.get('p_value'))})</summary>"
                       f"{contingency(wn.get('labels') or [], wn['table'], c)}</details>")
        if cc.get("note"):
            out.append(f'<p class="note">{esc(cc["note"])}</p>')
    return "".join(out)


def contingency(labels: list[str], tab: list[list[Any]], c: dict) -> str:
    """Rows: dominant branch in the first layer; columns: in the second; diagonal shaded."""
    la, lb = (list(c.get("layers") or []) + ["A", "B"])[:2]
    if not tab:
        return '<p class="na">no matched pairs</p>'
    head = f"<tr><th>{esc(la)} \\ {esc(lb)}</th>" + "".join(f"<th>{esc(x)}</th>" for x in labels)
    body = ""
    for i, row in enumerate(tab):
        cells = "".join(f'<td class="{"diag" if i == j else ""}">{fmt(v)}</td>'
                        for j, v in enumerate(row))
        body += f"<tr><th>{esc(labels[i] if i < len(labels) else i)}</th>{cells}</tr>"
    return f'<table class="cont"><thead>{head}</tr></thead><tbody>{body}</tbody></table>'


def category_section(ctx: ReportContext) -> str:
    """The paper's "5x5 ⇒ animals" claim per layer × branch, against the other latents."""
    per = (ctx.summary or {}).get("per_layer")
    if not per:
        return na("category test", "analyze", ctx)
    rows = []
    for layer, s in per.items():
        ct = s.get("category_test") or {}
        for key in ("robust_dominant", "dominant"):
            for b, t in (ct.get(key) or {}).items():
                if isinstance(t, dict) and "latents" in t:
                    rows.append((esc(layer), esc(key.replace("_", " ")), branch_tag(b),
                                 fmt(t.get("latents")), fmt(t.get("animal_fraction")),
                                 fmt(t.get("other_fraction")), fmt(t.get("base_rate")),
                                 fmt(t.get("difference")),
                                 f"[{fmt(t.get('ci_low'))}, {fmt(t.get('ci_high'))}]",
                                 fmt(t.get("p_value")), fmt(t.get("q_value_layers_x_branches"))))
    if not rows:
        return '<p class="na">no category test in the analysis (no labelled images?)</p>'
    return (table(["layer", "latents", "branch", "n", "animal fraction of top images",
                   "other latents", "base rate (held-out images)", "difference vs other "
                   "latents", "95 % CI", "p", "q (BH, layers × branches)"], rows)
            + '<p class="note">Mean over the branch\'s dominant latents of the animal fraction '
              "of their held-out top images (ImageNet labels), against the same mean over every "
              "other latent (the same top-image procedure; the held-out images' own rate is a "
              "reference only: top images of most latents are animal-rich). Latents share "
              "images, so the interval and p come from an image-cluster bootstrap (an image and "
              "its mirror resampled together).</p>")


def circuits_section(ctx: ReportContext) -> str:
    """Branch-to-branch attribution flow with its label-permutation null, and branch ablations."""
    if not ctx.circuits:
        return na("circuits", "circuits", ctx)
    out = []
    for doc in ctx.circuits:
        pair = f"{doc.get('up')} → {doc.get('down')}"
        out.append(f"<h3>{esc(pair)}</h3><p>mean share of the attribution that the SAE error "
                   f"carries: {fmt(doc.get('error_share_mean'))}</p>")
        flow = doc.get("flow")
        if isinstance(flow, dict) and flow.get("observed"):
            ups = flow.get("up_branches") or []
            rows = []
            for i, b in enumerate(flow.get("down_branches") or []):
                cells = []
                for j, _ in enumerate(ups):
                    obs, mu, p = (_at(flow.get(k), i, j) for k in ("observed", "null_mean",
                                                                   "p_value"))
                    cls = "diag" if isinstance(p, float) and p < 0.05 else ""
                    cells.append(f'<span class="{cls}">{fmt(obs)}</span> '
                                 f'<small>(null {fmt(mu)}, p {fmt(p, 2)})</small>')
                rows.append((f"{branch_tag(b)} n={fmt(_at(flow.get('n_down'), i))}", *cells))
            out.append(table(["downstream branch \\ upstream branch", *ups], rows, "flow")
                       + '<p class="note">Mean share of |attribution| that latents dominant in '
                         "a downstream branch receive from upstream latents dominant in each "
                         f"branch; null: {fmt(flow.get('n_perm'))} permutations of the upstream "
                         "labels (one-sided p).</p>")
        causal = [c for c in doc.get("causal") or [] if isinstance(c, dict)]
        if causal:
            names = list((causal[0].get("drop") or {}).keys())
            rows = [(esc(c.get("latent")), fmt(c.get("value")),
                     *(f"{fmt((c.get('drop') or {}).get(b))} / "
                       f"{fmt((c.get('attribution_channels') or {}).get(b))}" for b in names))
                    for c in causal]
            out.append(table(["latent", "value", *(f"{b}: drop / attr." for b in names)], rows)
                       + '<p class="note">Drop of the downstream latent when one upstream '
                         "branch is zeroed in the real forward pass, next to the gradient × "
                         "activation attribution of that branch's channels.</p>")
    return "".join(out)


def _at(x: Any, *idx: int) -> Any:
    for i in idx:
        if not isinstance(x, list) or i >= len(x):
            return None
        x = x[i]
    return x


def stability_section(ctx: ReportContext) -> str:
    """Latents and labels across the replicate SAEs (``branchlens stability``), per layer."""
    path = ctx.layout.stability_path
    if not path.is_file():
        return ""
    from branchlens.artifacts import read_json

    res = read_json(path)
    rows = []
    for layer, r in (res.get("per_layer") or {}).items():
        every = r.get("labelled_in_every_replicate") or {}
        for name, rep in (r.get("replicates") or {}).items():
            lab = rep.get("labelled") or {}
            per = rep.get("per_branch") or {}
            rows.append((
                esc(layer), esc(name), f"{fmt(rep.get('matched'))} / {fmt(rep.get('latents'))}",
                fmt(rep.get("median_best_cos")),
                f"{fmt(lab.get('same_label'))} / {fmt(lab.get('matched'))} "
                f"({fmt(lab.get('same_label_fraction'))})",
                ", ".join(f"{esc(b)} {fmt(c.get('same_label_fraction'))}"
                          for b, c in per.items() if b != "none"),
                f"{fmt(r.get('near_duplicates'))} / {fmt(rep.get('near_duplicates'))}",
                f"{fmt(every.get('same_label_everywhere'))} / {fmt(every.get('latents'))}"))
    head = ["layer", "replicate", f"latents matched (decoder cos ≥ {fmt(res.get('match_cos'))})",
            "median best cos", "labelled latents keeping their label", "… per branch",
            f"near-duplicates (cos ≥ {fmt(res.get('duplicate_cos'))}): this run / replicate",
            "labelled latents with the same label in every replicate"]
    return (f"<h3>Across SAE seeds ({fmt(res.get('replicates'))} SAEs per layer, seeds "
            f"{esc(res.get('seeds'))}, {fmt(res.get('seconds'))} s)</h3>" + table(head, rows)
            + '<p class="note">Each replicate trains the same SAE settings with another seed '
            "(initialisation, batch order, held-out images) and is analysed with the same "
            "settings; every claim is re-decided on these layers only.</p>")
