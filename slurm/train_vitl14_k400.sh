#!/usr/bin/env bash
# s4v_l14 (CLIP ViT-L/14 tower) on Kinetics-400, 8 frames.
#
#   cd /path/to/s4v && sbatch slurm/train_vitl14_k400.sh [key=value ...]
#
# Recipe ds_configs/experiments/k400_l14_f8.yaml (S4V_CONFIG picks another); one 8-GPU node, the setting of
# the recipe's global batch. Preemption, requeue, logs, venv: as in slurm/train_vite_k400.sh.
#
#SBATCH --job-name=s4v-l14-k400
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
s4v_train "${S4V_CONFIG:-ds_configs/experiments/k400_l14_f8.yaml}" "$@"
