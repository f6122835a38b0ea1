"""Train TopK SAEs on real InceptionV1 activations (BVLC weights, mixed4c, all 14x14 positions of
the shared sample images), with and without AuxK, and report FVU (train and held-out images)
and the dead fraction. Ends with ``RESULT auxk_dead ours=<dead with AuxK> baseline=<without>``.

Latents only die on small data or at a high learning rate; this reproduces the AuxK effect:

    python benchmarks/sae_real.py --train-images 60 --batch-size 1024 --lr 4e-3 --steps 600 \
        --dead-after 20000

    python benchmarks/sae_real.py --images /work/shared/data/imagenet-sample \
        --weights /work/shared/weights/bvlc_googlenet.safetensors [--epochs 5] [--expansion 16]

Activations are computed directly (model(x, layers=[layer])) and cached as a .npy next to the
output; held-out evaluation uses whole held-out images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def harvest(images: str, weights: str, layer: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    if cache.exists():
        z = np.load(cache)
        return z["x"], z["img"]
    from branchlens.data import iter_batches, open_source
    from branchlens.weights import load_model

    model, _ = load_model("bvlc_googlenet", weights, "cpu")
    src = open_source(images, "bvlc_googlenet")
    xs, imgs = [], []
    with torch.no_grad():
        for b in iter_batches(src, "bvlc_googlenet", batch_size=32, workers=1):
            a = model(b.images, layers=[layer])[layer]  # [B, C, H, W]
            xs.append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).numpy())
            imgs.append(np.repeat(np.asarray(b.indices), a.shape[2] * a.shape[3]))
    x, img = np.concatenate(xs).astype(np.float32), np.concatenate(imgs)
    np.savez(cache, x=x, img=img)
    return x, img


def main() -> None:
    from branchlens.sae import SAEConfig
    from branchlens.train import ArrayBatches, TrainConfig, train_sae

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="/work/shared/data/imagenet-sample")
    ap.add_argument("--weights", default="/work/shared/weights/bvlc_googlenet.safetensors")
    ap.add_argument("--layer", default="mixed4c")
    ap.add_argument("--out", default="runs/sae_real")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    ap.add_argument("--train-images", type=int, default=None,
                    help="train on this many of the non-held-out images only")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--dead-after", type=int, default=None,
                    help="vectors without firing = dead (default: half the training vectors)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, img = harvest(args.images, args.weights, args.layer, out / f"{args.layer}.npz")
    ids = np.unique(img)
    held_img = np.random.default_rng(0).permutation(ids)[: len(ids) // 10]
    held = np.isin(img, held_img)
    train = ~held
    if args.train_images is not None:
        keep = np.setdiff1d(ids, held_img)[: args.train_images]
        train = np.isin(img, keep)
    print(f"{len(x)} vectors of {args.layer} from {len(ids)} images; "
          f"{held.sum()} held out ({len(held_img)} images), {train.sum()} for training",
          flush=True)
    results = {}
    for aux in (True, False):
        cfg = SAEConfig.for_layer("bvlc_googlenet", args.layer, expansion=args.expansion,
                                  aux=aux, dead_after=args.dead_after)
        tcfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                           steps=args.steps, warmup_steps=10, log_every=10, ckpt_every=100)
        data = ArrayBatches(x, args.batch_size, seed=0, rows=np.nonzero(train)[0])
        heldout = ArrayBatches(x[held], args.batch_size, drop_last=False)
        sae = train_sae(data, cfg, tcfg, out / f"aux_{aux}", heldout=heldout)
        ev = sae.meta["eval"]
        results[f"aux={aux}"] = {"train_fvu": ev["train"]["fvu"],
                                 "heldout_fvu": ev["heldout"]["fvu"],
                                 "dead_frac": ev["dead_frac"], "dead_after": ev["dead_after"],
                                 "steps": sae.meta["train"]["step"]}
        print(json.dumps(results[f"aux={aux}"]), flush=True)
    print(json.dumps(results, indent=1))
    ours, base = results["aux=True"]["dead_frac"], results["aux=False"]["dead_frac"]
    ratio = base / ours if ours > 0 else float("inf") if base > 0 else 1.0
    print(f"RESULT auxk_dead ours={ours:.4f} baseline={base:.4f} unit=dead_fraction "
          f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
