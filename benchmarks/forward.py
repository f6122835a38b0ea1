"""Forward speed: stopping at mixed4e vs a full forward to the classifier, same batch, one run.

Prints images/s for both, the ratio, and the achieved GFLOP/s (conv + linear multiply-adds x 2,
counted with hooks on the modules that actually ran).

    python benchmarks/forward.py [--batch 32] [--iters 5] [--variant bvlc_googlenet]
"""

from __future__ import annotations

import argparse
import time

import torch

from branchlens.model import InceptionV1


def count_flops(model: InceptionV1, x: torch.Tensor, layers: list[str] | None) -> float:
    flops = 0.0

    def conv_hook(mod, inp, out):
        nonlocal flops
        k = mod.kernel_size[0] * mod.kernel_size[1]
        flops += 2.0 * out.numel() * mod.in_channels * k

    def lin_hook(mod, inp, out):
        nonlocal flops
        flops += 2.0 * out.numel() * mod.in_features

    hooks = [c.register_forward_hook(conv_hook) for c in model.convs.values()]
    hooks.append(model.classifier.register_forward_hook(lin_hook))
    with torch.inference_mode():
        model(x, layers)
    for h in hooks:
        h.remove()
    return flops


def time_forward(model, x, layers, iters: int) -> float:
    with torch.inference_mode():
        model(x, layers)  # warm-up
        t = time.perf_counter()
        for _ in range(iters):
            model(x, layers)
        return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variant", default="bvlc_googlenet")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = InceptionV1(args.variant).eval()  # speed does not depend on the weight values
    x = torch.randn(args.batch, 3, 224, 224)
    early, full = ["mixed4e"], None

    t_early = time_forward(model, x, early, args.iters)
    t_full = time_forward(model, x, full, args.iters)
    f_early = count_flops(model, x[:1], early) * args.batch
    f_full = count_flops(model, x[:1], full) * args.batch
    ips_early, ips_full = args.batch / t_early, args.batch / t_full
    print(f"threads={torch.get_num_threads()} batch={args.batch} iters={args.iters}")
    print(f"to mixed4e : {ips_early:8.1f} img/s  {f_early / t_early / 1e9:7.1f} GFLOP/s  "
          f"({f_early / args.batch / 1e9:.3f} GFLOP/img)")
    print(f"full       : {ips_full:8.1f} img/s  {f_full / t_full / 1e9:7.1f} GFLOP/s  "
          f"({f_full / args.batch / 1e9:.3f} GFLOP/img)")
    print(f"RESULT forward_to_mixed4e ours={ips_early:.2f} baseline={ips_full:.2f} unit=img/s "
          f"ratio={ips_early / ips_full:.2f}")


if __name__ == "__main__":
    main()
