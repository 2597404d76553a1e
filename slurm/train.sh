#!/usr/bin/env bash
# Train any recipe: one task per GPU on every node of the job.
#
#   cd /path/to/s4v && sbatch slurm/train.sh CONFIG.yaml [key=value ...]
#   sbatch --nodes=2 slurm/train.sh ds_configs/experiments/ssv2_l14_f8.yaml data.root=/scratch/ssv2
#
# CONFIG may also come from S4V_CONFIG (then every argument is an override). The defaults below are one
# 8-GPU node, the setting the recipes' global batch sizes assume. Preemption, requeue, logs, venv:
# as in slurm/train_vite_k400.sh (see its header) and slurm/common.sh.
#
#SBATCH --job-name=s4v-train
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

if [[ $# -gt 0 && $1 != *=* ]]; then
    config=$1
    shift
else
    config=${S4V_CONFIG:-}
fi
[[ -n $config ]] || s4v_die "usage: sbatch slurm/train.sh CONFIG.yaml [key=value ...] (or set S4V_CONFIG)"
s4v_setup
s4v_train "$config" "$@"
