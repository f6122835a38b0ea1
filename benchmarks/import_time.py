"""Start-up cost of the CLI: ``branchlens --help`` with the lazy package root vs an eager one.

Ours: ``python -m branchlens --help`` as shipped (the package root and the CLI import torch,
scipy and the stages only when a command needs them). Baseline: the same help after importing
every stage module up front, as the package root did before it became lazy (torch, scipy,
analysis, viz). Median of ``--repeat`` fresh processes each.

    python benchmarks/import_time.py [--repeat 5]

Ends with ``RESULT cli_help ours=<s> baseline=<s> unit=s ratio=<baseline/ours>``; a ratio
falling towards 1 means something heavy is imported at start-up again.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

EAGER = ("import branchlens.harvest, branchlens.store, branchlens.sae, branchlens.train, "
         "branchlens.analysis, branchlens.viz, branchlens.viz.circuits, branchlens.pipeline; ")
HELP = "import sys; sys.argv = ['branchlens', '--help']; from branchlens.cli import app; app()"


def timed(code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode not in (0,) or "Usage" not in r.stdout:
            raise SystemExit(f"help failed: {r.returncode} {r.stderr[-500:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    timed(HELP, 1)  # warm the file cache
    ours = timed(HELP, args.repeat)
    base = timed(EAGER + HELP, args.repeat)
    print(f"branchlens --help: lazy {ours:.2f} s, eager imports {base:.2f} s")
    print(f"RESULT cli_help ours={ours:.3f} baseline={base:.3f} unit=s ratio={base / ours:.2f}")


if __name__ == "__main__":
    main()
