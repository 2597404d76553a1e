#!/usr/bin/env bash
# Multi-view evaluation (the recipe's test_crops x test_clips views) of a trained run or model file,
# with the evaluation split divided over one task per GPU.
#
#   cd /path/to/s4v && sbatch slurm/eval.sh RUN_DIR [key=value ...]
#   sbatch slurm/eval.sh MODEL.pt CONFIG.yaml [key=value ...]
#
# RUN_DIR needs its exported model_side_head.pt (train.export=true, the default); the result goes to
# RUN_DIR/eval.json and a RESULT_JSON line in the log. Arguments are those of `s4v eval`.
#
#SBATCH --job-name=s4v-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
S4V_ROOT=${S4V_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $S4V_ROOT/slurm/common.sh ]] || { echo "no $S4V_ROOT/slurm/common.sh: submit from the s4v checkout or set S4V_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$S4V_ROOT/slurm/common.sh"

[[ $# -ge 1 ]] || s4v_die "usage: sbatch slurm/eval.sh RUN_DIR|MODEL.pt [CONFIG.yaml] [key=value ...]"
s4v_setup
[[ -e $1 ]] || s4v_die "no run dir or model file $1 (relative to $S4V_ROOT)"
s4v_log "eval $*"
s4v_srun python -m s4v.eval.main "$@"
