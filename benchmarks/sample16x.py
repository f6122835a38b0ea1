"""Wall time of the real-data preset: ``branchlens run IMAGES --preset sample16x``.

The shared 1000 ImageNet images plus mirrors, every position, 16× SAEs (k=32) on ≈2 M vectors
(480 steps × 4096, 5.6 passes) for each of mixed4a–4e, then analysis, the pictures of the
latents the claims rest on (feature visualizations, full and per branch), dataset examples of
every latent of every layer, and the report. The
budget (baseline) is one hour on a 2-core CPU, so ratio > 1 means it fits. Prints each
stage's time and the analysis' share.

    python benchmarks/sample16x.py [--images ../shared/data/imagenet-sample] [--out runs/sample16x]

``--keep`` resumes an existing run folder: stages already done with the same config are not
re-run, and the total is then the sum of the seconds each stage recorded in ``run.json`` when
it ran (so a run split over several invocations is still measured stage by stage).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from branchlens.pipeline import run

BUDGET_S = 3600.0
ANALYSIS_SHARE = 0.10  # the analysis' budget: a tenth of the preset's wall time
HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=str(HERE.parent.parent / "shared/data/imagenet-sample"))
    ap.add_argument("--out", default="runs/sample16x")
    shared_weights = HERE.parent.parent / "shared/weights/bvlc_googlenet.safetensors"
    ap.add_argument("--weights", default=str(shared_weights) if shared_weights.exists() else None,
                    help="BVLC safetensors (default: ../shared's, else $BRANCHLENS_BVLC_WEIGHTS)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", default=None, help="comma-separated subset (default: preset's)")
    ap.add_argument("--keep", action="store_true", help="resume the run folder, do not wipe it")
    args = ap.parse_args()
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    record = run(args.out, preset="sample16x", source=args.images, weights=args.weights,
                 device=args.device, stages=args.stages.split(",") if args.stages else None)
    wall = time.perf_counter() - t0
    secs = {s: float(r.get("seconds", 0.0)) for s, r in record["stages"].items()
            if r.get("status") == "done"}
    total = sum(secs.values())
    for stage, s in secs.items():
        print(f"{stage:10s} {s:8.1f} s  ({s / total:.1%})")
    print(f"sum of stages {total:.1f} s; this invocation {wall:.1f} s; "
          f"analysis share {secs.get('analyze', 0.0) / total:.1%}")
    missing = [s for s in ("harvest", "train", "analyze", "visualize", "examples", "report")
               if s not in secs]
    if missing:
        print(f"stages not done yet: {missing}")
        return
    print(headline(Path(args.out)))
    print(f"RESULT sample16x_wall ours={total:.1f} baseline={BUDGET_S:.0f} unit=s "
          f"ratio={BUDGET_S / total:.2f}")
    share = secs["analyze"] / total  # the goal: analysis at most 10 % of the preset's time
    print(f"RESULT sample16x_analysis_share ours={share:.3f} baseline={ANALYSIS_SHARE:.3f} "
          f"unit=fraction ratio={ANALYSIS_SHARE / share:.2f}")


def headline(run: Path) -> str:
    """The README's headline table (markdown) from ``analysis/summary.json``."""
    s = json.loads((run / "analysis" / "summary.json").read_text())
    lines = ["| layer | alive / latents | held-out FVU | significant raw (1x1/3x3/5x5/pool) | "
             "robust | explained by scale | robust-dominant |", "|---|---|---|---|---|---|---|"]
    for layer, p in s["per_layer"].items():
        br = p["branches"]
        fvu = ((p.get("sae_eval") or {}).get("heldout") or {}).get("fvu")

        def cells(key: str, rows: list = br) -> str:
            return "/".join(str(r[key]) for r in rows)

        lines.append(f"| {layer} | {p['tested']} / {p['latents']} | "
                     f"{'-' if fvu is None else f'{fvu:.3f}'} | {cells('significant')} | "
                     f"{cells('robust')} | {cells('explained_by_scale')} | "
                     f"{cells('robust_dominant')} |")
    lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |" for c in s["claims"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
