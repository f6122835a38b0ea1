"""Harvest speed: ours (one pass, all layers, early exit, sharded store) vs a paper-style baseline.

Baseline, as in the paper's notebook: for each layer separately, a full pass over the images with
a full forward to the classifier, the layer's output captured by forward hooks (the four branch
convs, ReLU, concatenation), norm-weighted sampling afterwards, fp32 vectors kept in RAM. Same
images, same decode workers and batch size, same machine, one run each.

Also: GEMM GFLOP/s of this machine (torch matmul), our forward GFLOP/s as a fraction of it, and
the peak RSS of harvesting 2000 vs 500 images in subprocesses (memory must not grow with N; by
default at mixed3a with every position stored, the cheapest forward that still writes far more
data per image than the mixed4a-4e/norm harvest).

    python benchmarks/harvest.py [--images 200] [--batch 32] [--workers 1] [--skip-rss]

Ends with exactly one line ``RESULT harvest ours=... baseline=... unit=img/s ratio=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from branchlens.data import iter_batches, open_source
from branchlens.harvest import DEFAULT_LAYERS, harvest, image_rng, sample_positions
from branchlens.model import InceptionV1
from branchlens.variants import BRANCHES
from branchlens.weights import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pick_weights() -> str:
    env = os.environ.get("BRANCHLENS_BVLC_WEIGHTS")
    if env and Path(env).is_file():
        return env
    p = SHARED / "weights" / "bvlc_googlenet.safetensors"
    return str(p) if p.is_file() else "random"


def pick_source(n: int) -> str:
    folder = SHARED / "data" / "imagenet-sample"
    if folder.is_dir() and len(open_source(str(folder))) >= n:
        return str(folder)
    return f"embedded:{n}"


def conv_gflop_per_image(model: InceptionV1, layers: list[str]) -> float:
    """Multiply-adds x 2 of every conv that runs up to the deepest of ``layers``."""
    flops = 0.0

    def hook(mod, inp, out):
        nonlocal flops
        flops += 2.0 * out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]

    hooks = [c.register_forward_hook(hook) for c in model.convs.values()]
    crop = model.variant.preprocessing.crop
    with torch.inference_mode():
        model(torch.zeros(1, 3, crop, crop), layers)
    for h in hooks:
        h.remove()
    return flops / 1e9


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def run_ours(model, source, n, layers, batch, workers) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = harvest(source, Path(d) / "store", layers, model=model, limit=n, batch_size=batch,
                      workers=workers, show_progress=False)
        dt = time.perf_counter() - t
        return n / dt, sum(res.manifest["counts"]["vectors"].values())


def run_baseline(model, source, n, layers, batch, workers, samples=10, seed=0
                 ) -> tuple[float, int]:
    """One full pass per layer, hooks, sampling after the forward, fp32 vectors in RAM."""
    model = model.to(memory_format=torch.contiguous_format)
    src = open_source(source, model.variant)
    kept: dict[str, list[np.ndarray]] = {}
    captured: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    for layer in layers:
        hooks = [model.convs[f"{layer}_{b}"].register_forward_hook(
            lambda mod, inp, out, b=b: captured.__setitem__(b, torch.relu(out)))
            for b in BRANCHES]
        kept[layer] = []
        with torch.no_grad():
            for bt in iter_batches(src, model.variant, batch, workers, indices=range(n)):
                model(bt.images)  # full forward to the logits
                act = torch.cat([captured[b] for b in BRANCHES], 1).numpy()  # fp32 [B,C,H,W]
                for i, idx in enumerate(bt.indices):
                    a = act[i].reshape(act.shape[1], -1)
                    pos = sample_positions(np.linalg.norm(a, axis=0), "norm", samples,
                                           image_rng(seed, idx, layer))
                    kept[layer].append(a[:, pos].T.copy())
        for h in hooks:
            h.remove()
    dt = time.perf_counter() - t
    return n / dt, sum(len(np.concatenate(v)) for v in kept.values())


RSS_CHILD = """
import json, resource, sys, tempfile, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from branchlens.harvest import harvest
with tempfile.TemporaryDirectory() as d:
    res = harvest(sys.argv[1], d + "/s", sys.argv[2], weights=sys.argv[3], sampling=sys.argv[4],
                  batch_size=int(sys.argv[5]), workers=int(sys.argv[6]), shard_size=50,
                  show_progress=False)
    mb = sum(p.stat().st_size for p in Path(d, "s", "shards").iterdir()) / 2**20
print(json.dumps({"self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "vectors": sum(res.manifest["counts"]["vectors"].values()), "stored_mb": mb}))
"""


def peak_rss(source: str, layers: str, sampling: str, batch: int, workers: int) -> dict:
    """Peak RSS (MB) of a harvest subprocess, its decode workers, and what it stored."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, source, layers, "random", sampling,
                        str(batch), str(workers)], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"rss": out["self_kb"] / 1024, "workers": out["children_kb"] / 1024,
            "vectors": out["vectors"], "stored_mb": out["stored_mb"],
            "s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-layers", default="mixed3a",
                    help="layers of the RSS runs (default: the cheapest forward on 2 cores)")
    ap.add_argument("--rss-sampling", default="all",
                    help="'all' stores ~7x more bytes per image than mixed4a-4e/norm")
    args = ap.parse_args()
    layers = list(DEFAULT_LAYERS)
    weights = pick_weights()
    source = pick_source(args.images)
    model, _ = load_model("bvlc_googlenet", weights)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    print(f"images: {args.images} from {source}; layers {','.join(layers)}; weights {weights}; "
          f"batch {args.batch}, decode workers {args.workers}")

    gemm = gemm_gflops()
    gflop = conv_gflop_per_image(model, layers)
    ours, n_ours = run_ours(model, source, args.images, layers, args.batch, args.workers)
    base, n_base = run_baseline(model, source, args.images, layers, args.batch, args.workers)
    assert n_ours == n_base == args.images * 10 * len(layers), (n_ours, n_base)
    print(f"harvest_img_per_s {ours:.2f} {base:.2f} ratio={ours / base:.2f}")
    print(f"gemm_gflops {gemm:.1f}")
    print(f"conv_gflop_per_image_to_{layers[-1]} {gflop:.3f}")
    print(f"our_forward_gflops {ours * gflop:.1f} fraction_of_gemm={ours * gflop / gemm:.2f} "
          "(end-to-end: decode, sampling and writes included)")
    if not args.skip_rss:
        big, small = (peak_rss(f"embedded:{k}", args.rss_layers, args.rss_sampling, args.batch,
                               args.workers) for k in (2000, 500))
        print(f"peak_rss_mb_2000_vs_500 {big['rss']:.0f} {small['rss']:.0f} "
              f"ratio={big['rss'] / small['rss']:.2f} (layers {args.rss_layers}, sampling "
              f"{args.rss_sampling}: {big['vectors']} vs {small['vectors']} vectors, "
              f"{big['stored_mb']:.0f} vs {small['stored_mb']:.0f} MB stored; decode workers "
              f"{big['workers']:.0f} vs {small['workers']:.0f} MB; {big['s']:.0f} s vs "
              f"{small['s']:.0f} s)")
    print(f"RESULT harvest ours={ours:.2f} baseline={base:.2f} unit=img/s ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
