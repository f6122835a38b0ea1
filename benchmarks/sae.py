"""SAE training throughput: our TopK step against the one-GEMM limit and against a paper-style
dense baseline, plus the memory of training from an activation store 4x larger than another.

One-GEMM limit: the only dense work left in our step is the encoder's forward GEMM
(2·d·n FLOP per vector); the limit is the vectors/s that GEMM alone would allow, GEMM FLOP/s /
(2·d·n), with FLOP/s measured here on a plain [B, d] @ [d, n] matmul (the faster of its two
layouts). Ours and the GEMM run interleaved, ``--rounds`` times, and the medians are reported
with their spread (the machine may be shared). Both widths the pipeline trains: d=512 (mixed4c,
n=8192) and d=832 (mixed4e, n=13312), k=32, batch 4096, with a breakdown of the step by part.

Paper-style baseline (the paper's notebook, d=512): tied, dense decode of the scattered top-k
(z [B, n] @ W), per-sample normalised MSE, plain Adam; ours: untied decoder, sparse step, FVU
loss, unit-norm decoder, AuxK armed (no latent is dead this early, so it costs nothing here).

    python benchmarks/sae.py [--rounds 5] [--steps 4] [--rss-vectors 50000]

Ends with ``RESULT sae_train ours=<vec/s> baseline=<vec/s> unit=vectors/s ratio=<x>`` and
``RESULT sae_gemm_limit ours=<vec/s> baseline=<limit vec/s> unit=vectors/s ratio=<x>`` (d=512;
``sae_gemm_limit_d832`` for mixed4e).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from branchlens.sae import SAEConfig, TopKSAE, time_parts
from branchlens.train import TrainConfig, make_adam

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _synthetic import planted_dictionary, write_synthetic  # noqa: E402  (test data, not shipped)

D, N, K, B = 512, 8192, 32, 4096
SHAPES = {"mixed4c": (512, 8192), "mixed4e": (832, 13312)}  # d, n of the 16x SAEs


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


def data(layer: str, n_batches: int) -> torch.Tensor:
    d = SHAPES[layer][0]
    _, x = planted_dictionary(4 * d, B * n_batches, k=K, layer=layer, seed=0)
    return x.abs()  # non-negative like post-ReLU activations


def our_sae(layer: str, x: torch.Tensor) -> tuple[TopKSAE, torch.optim.Optimizer]:
    d, n = SHAPES[layer]
    sae = TopKSAE(SAEConfig(d_in=d, n_latents=n, k=K, dead_after=10**9))
    sae.init_from_sample(x[:B])
    return sae, make_adam(list(sae.parameters()), TrainConfig(lr=4e-4))


def our_step(sae: TopKSAE, opt: torch.optim.Optimizer, xb: torch.Tensor) -> None:
    """One step exactly as the training loop does it (loss, update, dead-latent counters)."""
    loss, st = sae.loss(xb, B, sae.dead_mask())
    sae.update(loss, opt)
    sae.count_firing(st, B)


def gemm_timer(d: int, n: int):
    """A timer of one plain [B, d] @ [d, n] matmul in its faster layout (W stored [n, d] as
    ours, or [d, n]), the layout picked from two tries of each."""
    a, w = torch.randn(B, d), torch.randn(n, d)
    layouts = (w.t(), w.t().contiguous())

    def seconds(rhs: torch.Tensor) -> float:
        t0 = time.perf_counter()
        torch.mm(a, rhs)
        return time.perf_counter() - t0

    best = min(layouts, key=lambda rhs: min(seconds(rhs), seconds(rhs)))
    return lambda: seconds(best)


def gemm_limit(layer: str, rounds: int) -> dict:
    """Ours vs the one-GEMM limit, interleaved: per round one GEMM measurement and two steps."""
    d, n = SHAPES[layer]
    x = data(layer, 3)
    batches = list(x.split(B))
    sae, opt = our_sae(layer, x)
    our_step(sae, opt, batches[0])  # warm-up: kernels compiled (or loaded), buffers allocated
    gemm_seconds = gemm_timer(d, n)
    ours, limit, parts = [], [], []
    for _ in range(rounds):
        t_gemm = gemm_seconds()
        with time_parts() as p:
            t0 = time.perf_counter()
            for xb in batches[1:]:
                our_step(sae, opt, xb)
            t_step = (time.perf_counter() - t0) / (len(batches) - 1)
        ours.append(B / t_step)
        limit.append(B / t_gemm)
        parts.append({k: v / (len(batches) - 1) for k, v in p.items()}
                     | {"rest": t_step - sum(p.values()) / (len(batches) - 1)})
    ratios = [o / li for o, li in zip(ours, limit, strict=True)]
    med = statistics.median
    gemm_flops = med(limit) * 2 * d * n
    return {"layer": layer, "d": d, "n": n, "ours_vec_s": med(ours), "limit_vec_s": med(limit),
            "ratio": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ours_vec_s_range": [min(ours), max(ours)], "limit_vec_s_range": [min(limit),
                                                                               max(limit)],
            "gemm_gflop_s": gemm_flops / 1e9,
            "step_ms": 1e3 * B / med(ours),
            "parts_ms": {k: 1e3 * med(pp.get(k, 0.0) for pp in parts) for k in parts[-1]}}


def bench(step, batches) -> tuple[float, float]:
    step(batches[0])  # warm-up (allocations, thread pools)
    t0, c0 = time.perf_counter(), time.process_time()
    for xb in batches[1:]:
        step(xb)
    n = B * (len(batches) - 1)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def throughput(steps: int) -> dict:
    torch.manual_seed(0)
    x = data("mixed4c", steps + 2)
    batches, held = list(x[:-B].split(B)), x[-B:]
    ours, opt = our_sae("mixed4c", x)
    paper = PaperSAE()
    popt = torch.optim.Adam(paper.parameters(), lr=1e-3)

    def paper_step(xb):
        loss = paper.loss(xb)
        popt.zero_grad(set_to_none=False)
        loss.backward()
        popt.step()

    ours_wall, ours_cpu = bench(lambda xb: our_step(ours, opt, xb), batches)
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


def print_limit(g: dict) -> None:
    print(f"{g['layer']} (d={g['d']}, n={g['n']}): step {g['step_ms']:.0f} ms = "
          f"{g['ours_vec_s']:,.0f} vec/s; GEMM {g['gemm_gflop_s']:.0f} GFLOP/s -> limit "
          f"{g['limit_vec_s']:,.0f} vec/s; ratio {g['ratio']:.2f} (rounds "
          f"{g['ratio_min']:.2f}-{g['ratio_max']:.2f})")
    for part, ms in sorted(g["parts_ms"].items(), key=lambda kv: -kv[1]):
        print(f"    {part:32s} {ms:8.1f} ms  {ms / g['step_ms']:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="interleaved GEMM/step rounds")
    ap.add_argument("--steps", type=int, default=4, help="steps of the paper-style comparison")
    ap.add_argument("--rss-vectors", type=int, default=50_000)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, k={K} batch={B}",
          flush=True)
    limits = {layer: gemm_limit(layer, args.rounds) for layer in SHAPES}
    for g in limits.values():
        print_limit(g)
    print(json.dumps(limits, indent=1), flush=True)
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
    for layer, name in (("mixed4c", "sae_gemm_limit"), ("mixed4e", "sae_gemm_limit_d832")):
        g = limits[layer]
        print(f"RESULT {name} ours={g['ours_vec_s']:.0f} baseline={g['limit_vec_s']:.0f} "
              f"unit=vectors/s ratio={g['ratio']:.2f}")


if __name__ == "__main__":
    main()
