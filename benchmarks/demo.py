"""Wall time of ``branchlens run --preset demo`` from an empty run folder, per stage.

The README promises the demo finishes in under 10 minutes on a 2-core CPU; the reference
(baseline) is that 600 s budget, so ratio > 1 means the promise holds.

    python benchmarks/demo.py [--out /tmp/demo-bench] [--weights PATH]
"""

from __future__ import annotations

import argparse
import shutil
import time

from branchlens.pipeline import run

BUDGET_S = 600.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/branchlens-demo-bench")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    record = run(args.out, preset="demo", weights=args.weights, device=args.device,
                 log=lambda m: None)
    total = time.perf_counter() - t0
    for stage, s in record["stages"].items():
        print(f"{stage:10s} {s['seconds']:7.1f} s")
    print(f"total      {total:7.1f} s   report: {args.out}/report/index.html")
    print(f"RESULT demo_wall ours={total:.1f} baseline={BUDGET_S:.0f} unit=s "
          f"ratio={BUDGET_S / total:.2f}")


if __name__ == "__main__":
    main()
