#!/usr/bin/env bash
# GPU memory and speed table for s4v (B/16, L/14, E/14, 8 frames, batch 32 or the largest that fits)
# and the baselines of the same harness. Needs torch (CUDA), open_clip_torch, timm and this repo; no
# DALI, no DeepSpeed. Writes gpu_bench.md / gpu_bench.json / gpu_bench.log to $OUT (default bench/out).
# Usage: bash bench/gpu.sh [extra args for bench/gpu_bench.py, e.g. --models s4v_b16]
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT_DIR/gpu_info.txt" 2>&1 || true
# The python side stops starting rows after --budget-s; the outer timeout is a last resort.
timeout 285 "$PY" bench/gpu_bench.py --out "$OUT_DIR" --budget-s 200 "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
rc=${PIPESTATUS[0]}
echo "gpu_bench exit code $rc; results in $OUT_DIR/gpu_bench.md"
exit 0
