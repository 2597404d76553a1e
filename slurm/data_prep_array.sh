#!/usr/bin/env bash
# Shard one split of a dataset with a job array: task I of K writes every K-th shard group.
#
#   cd /path/to/s4v && sbatch --array=0-63 slurm/data_prep_array.sh --dataset k400 \
#       --videos /data/k400/videos --annotations /data/k400/annotations --split train --out /data/shards/k400
#
# Arguments are those of `python -m data_prep.shard`. It reads its part from Slurm itself
# (--num-jobs = $SLURM_ARRAY_TASK_COUNT, --job-index = $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN), so
# the array must be a contiguous range (a throttle like --array=0-63%16 is fine; steps or lists are not).
# --workers defaults to the task's CPUs. A task that is interrupted or fails can simply be rerun
# (`sbatch --array=17 ...`): finished shards are kept.
#
# The split index (OUT/<split>-index.json) is written by whichever task finds every shard group done,
# i.e. the last one to finish. If it is missing (a task failed and was rerun by hand, ...), merge it
# with one more task once the array is done:
#   sbatch --array=0 --dependency=afterok:<array job id> slurm/data_prep_array.sh --merge-index \
#       --out /data/shards/k400 --split train
#
#SBATCH --job-name=s4v-shard
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
S4V_ROOT=${S4V_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $S4V_ROOT/slurm/common.sh ]] || { echo "no $S4V_ROOT/slurm/common.sh: submit from the s4v checkout or set S4V_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$S4V_ROOT/slurm/common.sh"

[[ $# -ge 1 ]] || s4v_die "usage: sbatch --array=0-K slurm/data_prep_array.sh --dataset ... --split ... --out ..."
s4v_setup
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    count=${SLURM_ARRAY_TASK_COUNT:?} first=${SLURM_ARRAY_TASK_MIN:?} last=${SLURM_ARRAY_TASK_MAX:?}
    ((last - first + 1 == count)) ||
        s4v_die "array $first-$last has $count tasks, not $((last - first + 1)): use a contiguous range (--array=0-$((count - 1)))"
    s4v_log "array task $SLURM_ARRAY_TASK_ID: part $((SLURM_ARRAY_TASK_ID - first)) of $count"
fi
if [[ " $* " == *" --merge-index "* ]]; then
    if [[ -n ${SLURM_ARRAY_TASK_ID:-} && $SLURM_ARRAY_TASK_ID != "$first" ]]; then
        s4v_log "--merge-index: only the array's first task merges; nothing to do"
        exit 0
    fi
    exec python -m data_prep.shard "$@"
fi
# --workers first, so that one given by the user (later on the command line) wins
exec python -m data_prep.shard --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
