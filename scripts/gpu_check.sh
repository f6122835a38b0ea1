#!/usr/bin/env bash
# Device check (run on a CUDA machine): forward parity CPU vs CUDA, then the demo pipeline on
# CUDA end to end. Expects the BVLC weights at $BRANCHLENS_BVLC_WEIGHTS.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 - <<'PY'
import torch, time
from branchlens.weights import load_model
m, _ = load_model("bvlc_googlenet")
x = torch.randn(8, 3, 224, 224) * 50
with torch.no_grad():
    ref = m(x, ["mixed4c", "logits"])
    mc = m.to("cuda")
    got = mc(x.cuda(), ["mixed4c", "logits"])
for k in ref:
    err = (ref[k] - got[k].cpu()).abs().max().item() / ref[k].abs().max().item()
    print(f"parity {k}: max rel err {err:.2e}")
    assert err < 1e-3, k
PY
# Batched feature visualization on CUDA (the path behind "a picture for every latent"):
# 64 mixed4c channels at 224 px, 512 steps in one batch, and the quality benchmark's targets.
python3 - <<'PY'
import time, torch
from branchlens.weights import load_model
from branchlens.viz import objectives as O
from branchlens.viz.render import RenderConfig, render
m, _ = load_model("bvlc_googlenet", device="cuda")
for batch in (16, 64):
    torch.cuda.synchronize(); t = time.perf_counter()
    res = render(m, O.channel("mixed4c", list(range(batch))), batch, RenderConfig(steps=512))
    torch.cuda.synchronize(); s = time.perf_counter() - t
    clipped = float(((res.images < 0.02) | (res.images > 0.98)).float().mean())
    print(f"featurevis cuda: {batch} pictures, 224 px, 512 steps in {s:.1f} s "
          f"({60 * batch / s:.0f} pictures/min), clipped {clipped:.3f}")
PY
python3 benchmarks/featurevis_quality.py --size 224 --steps 512 --device cuda --sheet "$OUT/featurevis.png" \
  2>&1 | tail -3 || true
RUN=/tmp/gpu_run
time python3 -m branchlens run embedded:192 --out "$RUN" --device cuda 2>&1 | grep -v "━" | tail -40
cp "$RUN/run.json" "$OUT/" 2>/dev/null; cp "$RUN/report/index.html" "$OUT/report.html" 2>/dev/null
cp "$RUN/analysis/summary.json" "$OUT/" 2>/dev/null
python3 - <<PY
import json
r = json.load(open("$RUN/run.json"))
for s, v in r["stages"].items():
    print(s, v.get("status"), v.get("seconds"), v.get("error", ""))
PY
ls -la "$RUN/report" 2>/dev/null
# Interventions on CUDA: steer (α = 1 must change nothing) and the effects stage with timing.
python3 -m branchlens steer "$RUN" --layer mixed4c --latents 0,1 --scale 1 --device cuda --json 2>&1 | tail -1
time python3 -m branchlens effects "$RUN" --scope all --device cuda --no-progress 2>&1 | tail -4
