#!/usr/bin/env bash
# Features of a video corpus with a trained model (`s4v extract`), one task per GPU, each task a
# disjoint part of the sorted file list (parts j with j % tasks == task). Resumable: a requeued or
# resubmitted job skips the finished parts, also with another number of nodes or GPUs.
#
#   cd /path/to/s4v && sbatch slurm/extract.sh MODEL VIDEO_OR_DIR... --out DIR [--level frame] [--texts FILE]
#   sbatch --nodes=8 slurm/extract.sh runs/msrvtt_b16-job1234 /data/videos --out /data/feats --level frame
#
# Arguments are those of `s4v extract` (MODEL: a run directory, checkpoint folder or model file). The
# last task to finish writes DIR/index.json; `s4v search DIR "a text"` then ranks the videos.
#
#SBATCH --job-name=s4v-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
S4V_ROOT=${S4V_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $S4V_ROOT/slurm/common.sh ]] || { echo "no $S4V_ROOT/slurm/common.sh: submit from the s4v checkout or set S4V_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$S4V_ROOT/slurm/common.sh"

[[ $# -ge 3 ]] || s4v_die "usage: sbatch slurm/extract.sh MODEL VIDEO_OR_DIR... --out DIR [options of s4v extract]"
s4v_setup
[[ -e $1 ]] || s4v_die "no model $1 (relative to $S4V_ROOT)"
s4v_log "extract $*"
# Decoding workers per task: the task's CPUs minus one for the model.
s4v_srun python -m s4v.infer.extract --workers "$(( ${SLURM_CPUS_PER_TASK:-3} > 2 ? ${SLURM_CPUS_PER_TASK:-3} - 1 : 1 ))" "$@"
