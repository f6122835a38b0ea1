"""SAE training throughput: our sparse TopK step vs a paper-style dense baseline, plus the
memory of training from an activation store 4x larger than another.

Ours: untied decoder, sparse encode/decode backward (only the k selected rows), FVU loss,
unit-norm decoder, AuxK armed (no latent is dead this early, so it costs nothing here).
Baseline (the paper's notebook): tied, dense decode of the scattered top-k (z [B, n] @ W),
per-sample normalised MSE, plain Adam.

    python benchmarks/sae.py [--steps 6] [--rss-vectors 50000]

Ends with ``RESULT sae_train ours=<vec/s> baseline=<vec/s> unit=vectors/s ratio=<x>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from branchlens.sae import SAEConfig, TopKSAE
from branchlens.train import TrainConfig, make_adam

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _synthetic import planted_dictionary, write_synthetic  # noqa: E402  (test data, not shipped)

D, N, K, B = 512, 8192, 32, 4096


class PaperSAE(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(F.normalize(torch.randn(N, D, generator=g), dim=1))
        self.b_pre = torch.nn.Parameter(torch.zeros(D))
        self.b_latent = torch.nn.Parameter(torch.zeros(N))

    def forward(self, x):
        pre = (x - self.b_pre) @ self.W.t() + self.b_latent
        top = pre.topk(K, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        return z @ self.W + self.b_pre

    def loss(self, x):
        return ((self(x) - x).pow(2).mean(1) / x.pow(2).mean(1)).mean()


def fvu(xhat: torch.Tensor, x: torch.Tensor) -> float:
    return float((xhat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def bench(step, batches) -> tuple[float, float]:
    step(batches[0])  # warm-up (allocations, thread pools)
    t0, c0 = time.perf_counter(), time.process_time()
    for xb in batches[1:]:
        step(xb)
    n = B * (len(batches) - 1)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def throughput(steps: int) -> dict:
    torch.manual_seed(0)
    _, x = planted_dictionary(4 * D, B * (steps + 2), k=K, layer="mixed4c", seed=0)
    x = x.abs()  # non-negative like post-ReLU activations
    batches, held = list(x[:-B].split(B)), x[-B:]

    ours = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, dead_after=10**9))
    ours.init_from_sample(x[:B])
    opt = make_adam(list(ours.parameters()), TrainConfig(lr=4e-4))

    def our_step(xb):
        loss, st = ours.loss(xb, B, ours.dead_mask())
        ours.update(loss, opt)
        with torch.no_grad():
            fired = torch.bincount(st["idx"][st["l0_mask"]], minlength=N)
            ours.since_fired += B
            ours.since_fired[fired > 0] = 0

    paper = PaperSAE()
    popt = torch.optim.Adam(paper.parameters(), lr=1e-3)

    def paper_step(xb):
        loss = paper.loss(xb)
        popt.zero_grad(set_to_none=False)
        loss.backward()
        popt.step()

    ours_wall, ours_cpu = bench(our_step, batches)
    base_wall, base_cpu = bench(paper_step, batches)
    with torch.no_grad():
        f_ours, f_base = fvu(ours(held)[0], held), fvu(paper(held), held)
    return {"ours_vec_s": ours_wall, "baseline_vec_s": base_wall, "ours_vec_cpu_s": ours_cpu,
            "baseline_vec_cpu_s": base_cpu, "vectors_trained": B * len(batches),
            "heldout_fvu_ours": f_ours, "heldout_fvu_baseline": f_base}


def make_store(path: Path, n_vectors: int, d: int = D, per_image: int = 196) -> None:
    write_synthetic(path, "mixed4c", n_vectors // per_image, per_image, d, images_per_shard=64)


RSS_CHILD = """
import json, sys
from branchlens.train import TrainConfig, train_layers
run = sys.argv[1]
cfg = TrainConfig(batch_size=4096, epochs=1, warmup_steps=1, log_every=10**6, ckpt_every=10**6,
                  progress=False, plot=False, eval_max_vectors=8192, init_sample=8192)
train_layers(run, ["mixed4c"], {"k": 8}, cfg, expansion=1)
st = {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in open("/proc/self/status")
      if ln.startswith(("VmHWM", "RssAnon", "RssFile"))}
# VmHWM: peak of this process only (not the parent); RssFile: mapped store pages (page cache)
print(json.dumps({"maxrss_mb": st["VmHWM"], "end_anon_mb": st["RssAnon"],
                  "end_file_mb": st["RssFile"]}))
"""


def rss(n_small: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("small", n_small), ("large", 4 * n_small)):
            run = Path(tmp) / name
            make_store(run / "store", n)
            res = subprocess.run([sys.executable, "-c", RSS_CHILD, str(run)], check=True,
                                 capture_output=True, text=True)
            out[name] = {"vectors": n, "store_mb": n * D * 4 / 2**20,
                         **json.loads(res.stdout.strip().splitlines()[-1])}
    out["growth_mb"] = out["large"]["maxrss_mb"] - out["small"]["maxrss_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rss-vectors", type=int, default=50_000)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, d={D} n={N} k={K} "
          f"batch={B}", flush=True)
    t = throughput(args.steps)
    print(json.dumps(t, indent=1), flush=True)
    if args.rss_vectors:
        r = rss(args.rss_vectors)
        print(json.dumps(r, indent=1))
        print(f"peak RSS: store {r['small']['store_mb']:.0f} MB -> {r['small']['maxrss_mb']:.0f} "
              f"MB; 4x store {r['large']['store_mb']:.0f} MB -> {r['large']['maxrss_mb']:.0f} MB "
              f"(growth {r['growth_mb']:+.0f} MB)")
    print(f"own peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    ratio = t["ours_vec_s"] / t["baseline_vec_s"]
    print(f"RESULT sae_train ours={t['ours_vec_s']:.0f} baseline={t['baseline_vec_s']:.0f} "
          f"unit=vectors/s ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
