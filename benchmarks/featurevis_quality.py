"""Feature-visualization quality: objective reached vs steps, the parameterization shipped
before the fix (spectrum sqrt(h*w) too large, plain ReLU gradients) against ours (orthonormal
spectrum, redirected ReLU gradient for the first 16 steps), on the shared BVLC weights.

Targets: mixed4c channels 5 and 150 (loud on grey; Distill's face / texture units), 400 (5x5)
and 470 (pool) (silent on grey), and SAE latents: the 5x5- and pool-heaviest encoder rows of a
small TopK SAE fitted on the shared ImageNet sample (or of ``--run RUN``'s SAE). Same seed,
transforms, Adam and steps for both; the objective is measured on the final untransformed
image. Also reports the share of clipped pixels (< 0.02 or > 0.98), a speckle measure.

    python benchmarks/featurevis_quality.py [--size 128] [--steps 256] [--run RUN]

RESULT ratio: geometric mean over targets of ours / baseline objective at ``--steps``
(targets where the baseline is <= 0 count with the baseline floored at 0.1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from branchlens.viz import objectives as O  # noqa: E402
from branchlens.viz import param as P  # noqa: E402
from branchlens.viz.render import RenderConfig, render  # noqa: E402
from branchlens.weights import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LAYER = "mixed4c"
CHANNELS = [5, 150, 400, 470]


@contextmanager
def shipped_parameterization():
    """The pre-fix fft image: the same spectrum times sqrt(h*w) (the image is linear in it,
    and Adam's steps are invariant to a constant gradient scale, so this is exactly it)."""
    real = P.fft_image

    def legacy(batch, size, **kw):
        params, fn = real(batch, size, **kw)
        h, w = (size, size) if isinstance(size, int) else size
        return params, lambda: fn() * math.sqrt(h * w)

    P.fft_image = legacy
    try:
        yield
    finally:
        P.fft_image = real


def sae_targets(args, model) -> tuple[object, list[int]]:
    if args.run:
        from branchlens.run import Run

        sae = Run(args.run).sae(LAYER)
    else:
        import _vizkit as K

        sae = K.trained_sae(LAYER, n_latents=512, k=16, steps=150)
    from branchlens.variants import branch_slices
    from branchlens.viz.latents import encoder_affine, sae_d_in

    W = encoder_affine(sae, sae_d_in(sae)).W
    slices = branch_slices("bvlc_googlenet", LAYER)
    share = {b: W[:, s].norm(dim=1) / W.norm(dim=1).clamp_min(1e-8) for b, s in slices.items()}
    picks = [int(share["5x5"].argmax()), int(share["pool"].argmax())]
    return sae, picks


def clipped(images: torch.Tensor) -> torch.Tensor:
    return ((images < 0.02) | (images > 0.98)).float().flatten(1).mean(1)


def save_sheet(rows: list[torch.Tensor], path: str, gap: int = 4) -> None:
    """Rows of [N, 3, H, W] images in [0, 1] as one PNG on a white background."""
    from PIL import Image

    from branchlens.viz.featurevis import to_pil

    n, h, w = rows[0].shape[0], rows[0].shape[2], rows[0].shape[3]
    sheet = Image.new("RGB", (n * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for r, imgs in enumerate(rows):
        for c, img in enumerate(imgs):
            sheet.paste(to_pil(img), (c * (w + gap), r * (h + gap)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--run", default=None, help="take the SAE latents from RUN/sae/mixed4c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--sheet", default=None,
                    help="save a PNG: the baseline's pictures over ours, one column a target")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = SHARED / "weights" / "bvlc_googlenet.safetensors"
    model, info = load_model("bvlc_googlenet", weights if weights.is_file() else None,
                             device=args.device)
    sae, lat = sae_targets(args, model)
    objs = {"channels": (O.channel(LAYER, CHANNELS), [f"channel {c}" for c in CHANNELS]),
            "latents": (O.sae_latent(sae, LAYER, lat), [f"latent {j}" for j in lat])}
    cfg = RenderConfig(size=args.size, steps=args.steps, seed=0)
    marks = [s for s in (16, 32, 64, 128, 256, 512) if s < args.steps] + [args.steps]
    print(f"featurevis quality: {LAYER}, {args.size} px, {args.steps} steps, "
          f"threads {torch.get_num_threads()}")
    finals: dict[str, dict[str, float]] = {"baseline": {}, "ours": {}}
    rows: dict[str, list[torch.Tensor]] = {"baseline": [], "ours": []}
    for arm in ("baseline", "ours"):
        t = time.perf_counter()
        for objective, names in objs.values():
            n = len(names)
            if arm == "baseline":
                with shipped_parameterization():
                    res = render(model, objective, n,
                                 RenderConfig(**{**cfg.__dict__, "redirect_relu_steps": 0}))
            else:
                res = render(model, objective, n, cfg)
            clip = clipped(res.images)
            rows[arm].append(res.images)
            for i, name in enumerate(names):
                curve = " ".join(f"{m}:{float(res.trace[m - 1, i]):.3g}" for m in marks)
                print(f"  {arm:8s} {name:12s} final {float(res.values[i]):8.3f}  "
                      f"clipped {float(clip[i]):.2f}  (transformed, by step: {curve})")
                finals[arm][name] = float(res.values[i])
        print(f"  {arm} took {time.perf_counter() - t:.0f} s")
    if args.sheet:
        save_sheet([torch.cat(rows["baseline"]), torch.cat(rows["ours"])], args.sheet)
        print(f"pictures: {args.sheet} (top: baseline, bottom: ours)")
    ratios = [o / max(finals["baseline"][k], 0.1) for k, o in finals["ours"].items()]
    gm_ours = math.exp(sum(math.log(max(v, 1e-3)) for v in finals["ours"].values()) / len(ratios))
    gm_base = math.exp(sum(math.log(max(v, 0.1)) for v in finals["baseline"].values())
                       / len(ratios))
    ratio = math.exp(sum(math.log(max(r, 1e-3)) for r in ratios) / len(ratios))
    print(f"RESULT featurevis_quality ours={gm_ours:.2f} baseline={gm_base:.2f} "
          f"unit=objective_geomean ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
