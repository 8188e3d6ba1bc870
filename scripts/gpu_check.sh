#!/usr/bin/env bash
# scripts/gpu_check.sh: the GPU check, run by hand on a machine with one CUDA GPU (never a CI requirement; about
# 5 minutes on an H100 / H200, under 8). Three parts, each with its own time limit:
#   1. the GPU-marked tests: pytest -m gpu
#   2. a bf16 training run of the ~1B-parameter slice of the reference setup (configs/reference.yaml cut to 8 layers,
#      one GPU, model.attention_backend=flex, synthetic data): 30 steps of `megafusion train`; the loss must stay
#      finite and fall
#   3. benchmarks/gpu_train.py on the same slice: tokens/s and MFU of megafusion and of a plain-PyTorch model of the
#      same architecture, peak memory against megafusion.planning's estimate
# Environment: PYTHON (default python), OUT (default out/gpu_check: logs, the run folder, gpu_train.json).
# The last line printed is gpu_train.py's JSON ({"name": "gpu_train", "ratio": ..., "target": 1.0, ...}).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU is visible to $PYTHON (torch.cuda.is_available() is False): run this on a GPU machine" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$SECONDS

echo "== 1/3 GPU tests (pytest -m gpu)"
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tee "$OUT/pytest_gpu.log"

echo "== 2/3 bf16 training of the ~1B slice of the reference setup, flex attention, 30 steps"
mapfile -t slice < <("$PYTHON" benchmarks/gpu_train.py --print-slice-overrides --warmup 1 --steps 29)
rm -rf "$OUT/run"
timeout 240 "$PYTHON" -m megafusion.cli train --config reference "${slice[@]}" "training.run_dir=$OUT/run" \
    checkpoint.load=none 2>&1 | tee "$OUT/train.log"
"$PYTHON" - "$OUT/run/metrics.jsonl" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
losses = [float(r["loss"]) for r in rows]
assert len(losses) == 30, f"expected 30 logged steps, got {len(losses)}"
assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
assert last < first, f"the loss did not fall: first five {first:.4f}, last five {last:.4f}"
print(f"gpu_check: training ok: loss {first:.4f} -> {last:.4f} over 30 bf16 steps, "
      f"MFU {rows[-1].get('mfu', float('nan')):.3f} at the last step")
PY

echo "== 3/3 benchmarks/gpu_train.py (megafusion vs plain PyTorch, planner memory vs measured)"
timeout 300 "$PYTHON" benchmarks/gpu_train.py 2>&1 | tee "$OUT/gpu_train.log"
tail -n 1 "$OUT/gpu_train.log" > "$OUT/gpu_train.json"
echo "gpu_check: all parts passed in $((SECONDS - start)) s; outputs in $OUT"
cat "$OUT/gpu_train.json"
