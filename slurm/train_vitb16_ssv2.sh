#!/usr/bin/env bash
# s4v_b16 (CLIP ViT-B/16 tower) on Something-Something v2, 8 frames.
#
#   cd /path/to/s4v && sbatch slurm/train_vitb16_ssv2.sh [key=value ...]
#
# Recipe ds_configs/experiments/ssv2_b16_f8.yaml (S4V_CONFIG picks another); one 8-GPU node, the setting of
# the recipe's global batch. Preemption, requeue, logs, venv: as in slurm/train_vite_k400.sh.
#
#SBATCH --job-name=s4v-b16-ssv2
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
s4v_train "${S4V_CONFIG:-ds_configs/experiments/ssv2_b16_f8.yaml}" "$@"
