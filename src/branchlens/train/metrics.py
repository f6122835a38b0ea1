"""Training metrics: windowed sums all-reduced at log time, held-out evaluation, the plot."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from branchlens.artifacts import write_atomic
from branchlens.distributed import Dist
from branchlens.sae import TopKSAE


# ---------------------------------------------------------------------------------------------
# Metrics and evaluation
# ---------------------------------------------------------------------------------------------
class MetricsWindow:
    """Sums over a logging window; all-reduced at log time so every rank reports global numbers."""

    def __init__(self, d: int):
        self.d = d
        self.reset()

    def reset(self) -> None:
        self.buf = torch.zeros(self.d + 7, dtype=torch.float64)
        self.t0 = time.perf_counter()

    def add(self, xs: Tensor, stats: dict[str, Tensor], loss: Tensor) -> None:
        b = self.buf
        b[:self.d] += xs.sum(0).double().cpu()
        b[self.d:] += torch.tensor([
            xs.double().pow(2).sum().item(), stats["sse"].item(), stats["nmse_sum"].item(),
            stats["l0_sum"].item(), stats["aux"].item(), xs.shape[0], loss.item()])

    def summary(self, dist: Dist, steps: int) -> dict[str, float]:
        b = dist.sum(self.buf.clone())
        sx, (sq, sse, nmse, l0, aux, n, loss) = b[:self.d], b[self.d:].tolist()
        var = sq - float(sx.pow(2).sum()) / max(n, 1)
        dt = time.perf_counter() - self.t0
        return {"fvu": sse / max(var, 1e-12), "nmse": nmse / max(n, 1), "l0": l0 / max(n, 1),
                "aux_loss": aux / max(steps, 1), "loss": loss / max(steps, 1),
                "vec_per_s": n / max(dt, 1e-9)}


@torch.no_grad()
def evaluate(sae: TopKSAE, batches: Iterable[Tensor], max_vectors: int | None = None
             ) -> dict[str, float]:
    """FVU, paper-normalised MSE and L0 over the given vectors (input units)."""
    sse = sq = nmse = l0 = n = 0.0
    sx = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    for x in batches:
        if max_vectors is not None and n >= max_vectors:
            break
        x = x.to(sae.b_pre.device).float()
        xhat, info = sae(x)
        err = (xhat - x).double().pow(2).sum(1)
        sse += float(err.sum())
        nmse += float((err / x.double().pow(2).sum(1).clamp_min(1e-12)).sum())
        sq += float(x.double().pow(2).sum())
        sx += x.double().sum(0).cpu()
        l0 += float((info["vals"] > 0).sum())
        n += x.shape[0]
    if n == 0:
        return {"n": 0}
    var = sq - float(sx.pow(2).sum()) / n
    return {"fvu": sse / max(var, 1e-12), "nmse": nmse / n, "l0": l0 / n, "n": int(n)}


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training curves (FVU, normalised MSE, L0, dead fraction, AuxK, throughput) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "step" in r and not r.get("final")]
    keys = ["fvu", "nmse", "l0", "dead_frac", "aux_loss", "vec_per_s"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in ("fvu", "nmse") and rows and min(r[key] for r in rows) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    write_atomic(png_path, lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and not json.loads(ln).get("final") and json.loads(ln)["step"] <= step]
    write_atomic(path, lambda p: p.write_text("".join(ln + "\n" for ln in keep)))
