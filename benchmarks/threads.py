"""A heavy stage beside another busy torch process: its own thread choice vs torch's default.

The workload is a feature-visualization step (forward to mixed4c and back, 128 px, batch 4),
the stage that collapsed to 0.2x beside another process. Three timings in one run:
alone (the stage's choice: every core), beside a 2-thread torch GEMM loop with torch's
default thread count (every core: oversubscribed; the baseline), and beside it with
:func:`branchlens.threads.stage_threads`, which leaves the busy cores to the other process.
The other process' GEMM rate is printed too, so the comparison shows the total work done.

    python benchmarks/threads.py [--weights ../shared/weights/bvlc_googlenet.safetensors]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from branchlens.threads import stage_threads, usable_cores

HERE = Path(__file__).resolve().parent
HOG = """
import sys, time, torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
n, t0 = 0, time.perf_counter()
while True:
    a @ a
    n += 1
    if n % 20 == 0:
        print(2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9, flush=True)
"""


def steps_per_s(model, seconds: float) -> float:
    x = torch.randn(4, 3, 128, 128, requires_grad=True)
    model(x, layers=["mixed4c"])["mixed4c"].mean().backward()  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(x, layers=["mixed4c"])["mixed4c"].mean().backward()
        n += 1
    return n / (time.perf_counter() - t0)


def beside_hog(model, seconds: float, auto: bool) -> tuple[float, float]:
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # let it reach its steady state before the stage measures the load
        if auto:
            with stage_threads("featurevis", log=print):
                rate = steps_per_s(model, seconds)
        else:
            torch.set_num_threads(usable_cores())
            rate = steps_per_s(model, seconds)
    finally:
        hog.kill()
        out = hog.stdout.read().split()
    return rate, float(out[-1]) if out else float("nan")


def main() -> None:
    from branchlens.weights import load_model

    ap = argparse.ArgumentParser()
    shared = HERE.parent.parent / "shared/weights/bvlc_googlenet.safetensors"
    ap.add_argument("--weights", default=str(shared) if shared.exists() else None)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    model, _ = load_model("bvlc_googlenet", args.weights)
    model.eval()
    with stage_threads("featurevis", log=print):
        alone = steps_per_s(model, args.seconds)
    default, hog_default = beside_hog(model, args.seconds, auto=False)
    ours, hog_ours = beside_hog(model, args.seconds, auto=True)
    print(f"alone {alone:.2f} steps/s; beside a 2-thread GEMM loop: torch default threads "
          f"{default:.2f} steps/s (other process {hog_default:.1f} GFLOP/s), stage_threads "
          f"{ours:.2f} steps/s (other process {hog_ours:.1f} GFLOP/s)")
    print(f"RESULT threads_beside_busy ours={ours:.3f} baseline={default:.3f} unit=steps/s "
          f"ratio={ours / default:.2f}")


if __name__ == "__main__":
    main()
