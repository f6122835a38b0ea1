"""Feature visualization throughput: N latents optimised as one batch vs one at a time.

Same layer, image size, steps and transforms for both; one run each (no warm-up repeats).
The default step count is small so the benchmark takes a few minutes on a 2-core CPU; the ratio
is a per-step property, so more steps change the absolute rates, not the comparison.

    python benchmarks/featurevis.py [--latents 16] [--steps 8] [--size 128] [--layer mixed4c]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

from branchlens.sae import SAEConfig, TopKSAE
from branchlens.viz.featurevis import visualize_latents
from branchlens.viz.render import RenderConfig
from branchlens.weights import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--layer", default="mixed4c")
    ap.add_argument("--variant", default="bvlc_googlenet")
    args = ap.parse_args()

    weights = SHARED / "weights" / "bvlc_googlenet.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        use = str(weights) if weights.is_file() and args.variant == "bvlc_googlenet" else "random"
        model, info = load_model(args.variant, use)
    # The objective reads 16x encoder rows; their values do not affect the cost per step.
    sae = TopKSAE(SAEConfig.for_layer(args.variant, args.layer, expansion=16), seed=0).eval()
    latents = list(range(0, sae.cfg.n_latents, sae.cfg.n_latents // args.latents))[:args.latents]
    cfg = RenderConfig(size=args.size, steps=args.steps)
    print(f"featurevis: {args.variant} ({info.source}) {args.layer}, {len(latents)} latents, "
          f"{args.size} px, {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")

    t = time.perf_counter()
    visualize_latents(model, sae, args.layer, latents, cfg=cfg, batch_size=len(latents),
                      show_progress=False)
    batched_s = time.perf_counter() - t
    print(f"batched ({len(latents)} at once): {batched_s:.1f} s")

    t = time.perf_counter()
    visualize_latents(model, sae, args.layer, latents, cfg=cfg, batch_size=1,
                      show_progress=False)
    single_s = time.perf_counter() - t
    print(f"one at a time: {single_s:.1f} s")

    ours = 60.0 * len(latents) / batched_s
    base = 60.0 * len(latents) / single_s
    print(f"RESULT featurevis ours={ours:.2f} baseline={base:.2f} unit=latents/min "
          f"ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
