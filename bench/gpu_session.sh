#!/usr/bin/env bash
# The GPU checks of one lent H100/H200 session (see docs/performance.md), in stages that each fit one
# device call (at most 600 s) and can run in any order:
#   bench:  the memory/speed table with --trace-peak (bench/gpu.sh; rows in priority order, B/16's
#           memory-saving mode first, then L/14 and E/14, then the comparisons).
#   tests:  the GPU unit tests and a 1-GPU DeepSpeed bf16 training run (PyAV loader over H.264 shards).
#   dali:   after DALI is unpacked into $S4V_SITE: the DALI `mixed` (NVDEC) tests, a 1-GPU training run
#           on DALI-decoded H.264 shards, and the loader table (PyAV vs DALI GPU).
#   issue17: after DALI is unpacked, issue 17 part 2 in one call (~9 min, most important first): the DALI
#           GPU loader with 1, 2, 4 pipelines on H.264 320 px GOP-16 shards, step time / memory / MFU of
#           s4v_b16 (batch 32, default and checkpointing), s4v_l14 (16), s4v_e14 (8), eager and compiled,
#           each trained on the DALI GPU loader's batches (loader clips/s beside them), then a
#           DALI-decoded DeepSpeed training run of s4v_b16. CPU check of every command (5 min, PyAV):
#           DRY=1 SIZE=32 B16=s4v_tiny L14=s4v_tiny E14=s4v_tiny BATCH=2 STEPS=2 MODEL_ARGS="model.backbone_dtype=fp32
#           engine.ds_config=ds_configs/zero2_fp32.json data.image_size=32 data.resize_short=32 data.num_workers=1
#           train.compile=none" PATH=$PWD/.venv/bin:$PATH bash bench/gpu_session.sh issue17
# (part1 = tests + bench, part2 = dali, for older notes.)
# Python packages come from $S4V_SITE (wheels carried to the machine; see the device notes). DALI needs,
# besides nvidia/dali, nvimgcodec and libnvcomp: optree, astunparse, six, packaging, gast, libcst, makefun, nvtx and the
# top-level `wds2idx` module (the loader tests index their shards with `python -m wds2idx`).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONPATH="${S4V_SITE:-/tmp/site}:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=python3
step() { echo; echo "=== $* ($(date +%T))"; }

synthetic() {  # synthetic pair4 shards: $1 out dir, then extra data_prep.synthetic args
  local out=$1; shift
  [ -f "$out/train-index.json" ] || $PY -m data_prep.synthetic --out "$out" --workers 12 --no-progress "$@"
}

train_smoke() {  # $1 run name, $2 loader, $3 shards
  timeout 240 $PY -m s4v.train ds_configs/experiments/demo_tiny.yaml "data.root=$3" "data.loader=$2" \
    data.device=gpu data.num_workers=4 engine.ds_config=ds_configs/zero2_bf16.json \
    model.backbone_dtype=bf16 train.epochs=3 eval.every_epochs=1 train.output_dir=/tmp/s4v_runs \
    "train.run_name=$1" train.log_every_steps=20 2>&1 | grep -v "it/s" | grep -v "FutureWarning\|warnings.warn" | tail -n 40
  grep -h '"perf/clips_per_s"' "/tmp/s4v_runs/$1/metrics.jsonl" | tail -n 2
}

stage_bench() {
  step "memory / speed table"; OUT="$OUT" bash bench/gpu.sh --budget-s "${BENCH_BUDGET_S:-200}" --trace-peak
}

stage_tests() {
  step "GPU"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, open_clip, timm, deepspeed; print(torch.__version__, open_clip.__version__, timm.__version__, deepspeed.__version__)"
  step "GPU unit tests"; timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15
  step "synthetic H.264 shards (64 px: NVDEC decodes H.264 from 48 px wide)"; synthetic /tmp/synth_h264 --codec h264 --size 64
  step "1-GPU DeepSpeed bf16 training, PyAV loader"; train_smoke gpu_pyav pyav /tmp/synth_h264
}

stage_dali() {
  $PY -c "import nvidia.dali as d; print('DALI', d.__version__)" || return 1
  step "NVDEC"; echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-unset}"
  ls -l /usr/lib/x86_64-linux-gnu/libnvcuvid* /usr/lib64/libnvcuvid* 2>&1 | head -n 4
  $PY -c "from s4v.data.dali_pipeline import nvdec_problem as p; print(p() or 'libnvcuvid loads')"
  step "DALI mixed (NVDEC) tests"; timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_loader.py 2>&1 | tail -n 15
  step "synthetic H.264 shards (64 px)"; synthetic /tmp/synth_h264 --codec h264 --size 64
  step "1-GPU DeepSpeed bf16 training, DALI GPU decoding"; train_smoke gpu_dali dali /tmp/synth_h264
  step "loader table: 320px clips of 64 frames"; synthetic /tmp/synth_320 --codec h264 --size 320 --frames 64 --train 256 --val 16
  timeout 200 $PY -m s4v.cli.main bench loader --shards /tmp/synth_320 --split train --batches 12 \
    --batch-size 16 --num-frames 8 --workers 8 --engines pyav,dali-gpu 2>&1 | tail -n 12 | tee "$OUT/loader_bench.txt"
}

stage_issue17() {
  local dev=${DRY:+cpu} loader=${DRY:+pyav} n=${DRY:+8}
  dev=${dev:-cuda}; loader=${loader:-dali-gpu}; n=${n:-256}
  local size=${SIZE:-320} cli="$PY -m s4v.cli.main"
  step "GPU"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tail -n 2
  $PY -c "import torch, deepspeed; print(torch.__version__, deepspeed.__version__)"
  step "H.264 shards, ${size} px, GOP 16, 64 frames"; synthetic /tmp/synth_i17 --codec h264 --size "$size" --frames 64 --train "$n" --val 16
  for p in 1 2 4; do
    step "loader: $loader, $p pipeline(s)"
    timeout 90 $cli bench loader --shards /tmp/synth_i17 --batches 12 --batch-size "${BATCH:-16}" --workers 8 \
      --engines "${loader}" --pipelines "$p" --dtype float16 --no-reference 2>&1 | tail -n 3 | tee -a "$OUT/issue17_loader.txt"
    [ -n "${DRY:-}" ] && break
  done
  local rows=("${B16:-s4v_b16} 32 default,default+ckpt" "${L14:-s4v_l14} 16 default,default+ckpt" "${E14:-s4v_e14} 8 default+ckpt")
  for row in "${rows[@]}"; do
    set -- $row
    step "throughput: $1, batch $2 ($3), eager and compiled, on $loader batches"
    timeout 150 $cli bench throughput --models "$1" --batch "${BATCH:-$2}" --variants "$3" --compile none,side \
      --frames 8 --steps "${STEPS:-10}" --warmup 3 --precision bf16 --device "$dev" --shards /tmp/synth_i17 \
      --loader "$loader" --workers 8 2>&1 | tail -n 14 | tee -a "$OUT/issue17_throughput.txt"
  done
  step "DeepSpeed training of ${B16:-s4v_b16} on DALI-decoded batches"
  timeout 120 $PY -m s4v.train ds_configs/experiments/k400_b16_f8.yaml "model.name=${B16:-s4v_b16}" model.pretrained=null \
    model.num_classes=auto data.root=/tmp/synth_i17 "data.loader=${loader%%-*}" "data.device=${dev/cuda/gpu}" \
    data.batch_size="${BATCH:-32}" data.num_workers=8 data.min_shards_per_reader=0 train.global_batch_size=null \
    train.max_steps="${STEPS:-30}" train.epochs=1 eval.every_epochs=0 eval.at_end=false train.output_dir=/tmp/s4v_runs \
    train.run_name=i17_b16 train.log_every_steps=5 ${MODEL_ARGS:-} 2>&1 | grep -v "it/s\|FutureWarning\|warnings.warn" | tail -n 25
  grep -h '"perf/clips_per_s"' /tmp/s4v_runs/i17_b16/metrics.jsonl 2>/dev/null | tail -n 2
}

for stage in "${@:-tests}"; do
  case "$stage" in
  bench) stage_bench ;;
  tests) stage_tests ;;
  dali | part2) stage_dali ;;
  issue17) stage_issue17 ;;
  part1) stage_tests; stage_bench ;;
  *) echo "unknown stage $stage (bench, tests, dali, issue17)" >&2; exit 2 ;;
  esac
done
