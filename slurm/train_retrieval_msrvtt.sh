#!/usr/bin/env bash
# s4v_retrieval_b16 (OpenAI CLIP ViT-B/16 towers) text-video retrieval on MSR-VTT, 12 frames (the official training script's backbone).
#
#   cd /path/to/s4v && sbatch slurm/train_retrieval_msrvtt.sh [key=value ...]
#
# Recipe ds_configs/experiments/msrvtt_b16_f12.yaml (S4V_CONFIG picks another backbone: msrvtt_{b32,b16,l14,e14}_f12.yaml);
# one 8-GPU node: 16 videos x 8 GPUs = the official global batch of 128 pairs (the contrastive loss is taken
# over the global batch, so keep 128 with other GPU counts: data.batch_size=128/GPUs). model.pretrained names
# the CLIP checkpoint holding both towers. Evaluate with `sbatch slurm/eval.sh RUN_DIR`.
# Preemption, requeue, logs, venv: as in slurm/train_vite_k400.sh.
#
#SBATCH --job-name=s4v-retrieval-msrvtt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
S4V_ROOT=${S4V_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $S4V_ROOT/slurm/common.sh ]] || { echo "no $S4V_ROOT/slurm/common.sh: submit from the s4v checkout or set S4V_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$S4V_ROOT/slurm/common.sh"

s4v_setup
s4v_train "${S4V_CONFIG:-ds_configs/experiments/msrvtt_b16_f12.yaml}" "$@"
