# shellcheck shell=bash
# Shared logic of the s4v Slurm scripts (slurm/*.sh). Sourced, never run; needs bash 4+.
#
# Every script starts with the same few lines that find this file: Slurm runs a *copy* of the batch
# script from its spool folder, so the checkout is found through $S4V_ROOT, else the submit folder
# ($SLURM_SUBMIT_DIR: submit from the checkout), else the script's own folder (when run with bash).
#
# Environment knobs (all optional; the job inherits the submitting shell's environment):
#   S4V_ROOT          the s4v checkout (default: $SLURM_SUBMIT_DIR)
#   S4V_VENV          virtual environment to use (default: $S4V_ROOT/.venv; "none": use PATH as is)
#   S4V_CONFIG        recipe for the per-recipe scripts (default: the script's own recipe)
#   S4V_MASTER_PORT   rendezvous port (default: 10000 + job id % 20000, stable across a requeue)
#   S4V_TASKS_PER_NODE processes per node (default: --ntasks-per-node, else the GPUs of the node)
#   S4V_SRUN_ARGS     extra srun options, e.g. "--cpu-bind=none"
#   OMP_NUM_THREADS, NCCL_*  respected if set; otherwise the defaults below

s4v_log() { echo "[s4v-slurm $(date '+%F %T')] $*" >&2; }
s4v_die() {
    s4v_log "error: $*"
    exit 2
}

# cd to the checkout, activate the venv, set the rendezvous and NCCL defaults; print the job's facts.
s4v_setup() {
    S4V_STEP_PID=
    trap 's4v_forward USR1' USR1
    trap 's4v_forward TERM' TERM
    cd "$S4V_ROOT" || s4v_die "cannot cd to $S4V_ROOT"
    [[ -d ds_configs && -d s4v ]] ||
        s4v_die "$S4V_ROOT is not an s4v checkout: submit from the checkout (cd /path/to/s4v && sbatch slurm/...) or set S4V_ROOT"

    local venv=${S4V_VENV:-$S4V_ROOT/.venv}
    if [[ $venv != none ]]; then
        [[ -x $venv/bin/python ]] || s4v_die "no virtual environment at $venv (run \`make venv\` in $S4V_ROOT, or set S4V_VENV=/path/to/venv or S4V_VENV=none)"
        # What `activate` does, without its prompt handling (which is not `set -u` clean everywhere).
        export VIRTUAL_ENV=$venv
        export PATH=$venv/bin:$PATH
        unset PYTHONHOME
    fi

    # Inherited torchrun variables would stop s4v.train.dist from deriving ranks from SLURM_* (it keeps
    # an existing RANK), and a MASTER_ADDR from the login shell would point at the wrong host.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK GROUP_WORLD_SIZE \
        ROLE_WORLD_SIZE TORCHELASTIC_RUN_ID MASTER_ADDR MASTER_PORT

    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        # `scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1`, without SIGPIPE under pipefail
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
        [[ -n $MASTER_ADDR ]] || s4v_die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave nothing"
        MASTER_PORT=${S4V_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
    else  # `bash slurm/train.sh ...` outside Slurm: one process on this machine
        MASTER_ADDR=127.0.0.1
        MASTER_PORT=${S4V_MASTER_PORT:-29500}
    fi
    export MASTER_ADDR MASTER_PORT

    local cpus=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus < 8 ? cpus : 8))}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1} # older torch reads this name
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    # The run dir keeps a copy of the batch script as it was submitted (Slurm's spool copy).
    S4V_SBATCH_SCRIPT=$(readlink -f "$0")
    export S4V_SBATCH_SCRIPT

    S4V_TPN=${S4V_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}
    S4V_TPN=${S4V_TPN%%(*} # "8(x2)" forms
    if [[ -n ${SLURM_GPUS_ON_NODE:-} && $SLURM_GPUS_ON_NODE != "$S4V_TPN" ]]; then
        s4v_log "warning: $S4V_TPN tasks per node but $SLURM_GPUS_ON_NODE GPUs per node (one task per GPU is intended)"
    fi

    s4v_log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "${SLURM_JOB_NUM_NODES:-1} node(s) x $S4V_TPN task(s), ${SLURM_CPUS_PER_TASK:-1} CPU(s)/task," \
        "GPUs/node ${SLURM_GPUS_ON_NODE:-0}"
    s4v_log "requeue count (SLURM_RESTART_COUNT): ${SLURM_RESTART_COUNT:-0}"
    s4v_log "rendezvous $MASTER_ADDR:$MASTER_PORT; python $(command -v python); checkout $S4V_ROOT" \
        "($(git -C "$S4V_ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
}

# Run "$@" as one srun step with one task per GPU on every node of the job (or directly outside Slurm).
# srun runs in the background so that this shell stays responsive to signals: a SIGUSR1 that reaches
# the batch shell (`--signal=B:USR1@300`, `scancel --batch/--full -s USR1`) is forwarded to the tasks,
# and a SIGTERM does not end the shell while the tasks save their checkpoint.
s4v_srun() {
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        s4v_log "not in a Slurm job: running in the foreground: $*"
        "$@"
        return
    fi
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    local -a extra=()
    [[ -n ${S4V_SRUN_ARGS:-} ]] && read -r -a extra <<<"$S4V_SRUN_ARGS"
    # Slurm >= 22.05 srun does not inherit the job's --cpus-per-task: pass it on.
    local -a cmd=(srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks=$((nodes * S4V_TPN))
        --ntasks-per-node="$S4V_TPN" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${extra[@]}" "$@")
    s4v_log "${cmd[*]}"
    "${cmd[@]}" &
    S4V_STEP_PID=$!
    local rc
    while :; do
        S4V_INTERRUPTED=0
        rc=0
        wait "$S4V_STEP_PID" || rc=$?
        # wait returns >128 when a trapped signal interrupts it; the step is still running then
        if ((S4V_INTERRUPTED && rc > 128)) && kill -0 "$S4V_STEP_PID" 2>/dev/null; then continue; fi
        break
    done
    S4V_STEP_PID=
    s4v_log "srun exited with status $rc"
    return "$rc"
}

s4v_forward() {
    S4V_INTERRUPTED=1
    if [[ -n ${S4V_STEP_PID:-} ]]; then
        s4v_log "batch shell got SIG$1: forwarding it to the tasks (srun passes it on)"
        kill -s "$1" "$S4V_STEP_PID" 2>/dev/null || true
    else
        s4v_log "batch shell got SIG$1 with no step running: ignored"
    fi
}

# Train: s4v_train CONFIG.yaml [key=value ...]. A preempted run checkpoints, requeues this job
# (`scontrol requeue`, from rank 0) and exits 0; the requeued job resumes (train.resume=auto,
# run dir <model>-job<SLURM_JOB_ID>).
s4v_train() {
    local config=$1
    shift
    [[ -f $config ]] || s4v_die "no config file $config (relative to $S4V_ROOT)"
    s4v_log "train $config $*"
    local rc=0
    s4v_srun python -m s4v.train "$config" "$@" || rc=$?
    if ((rc == 0)); then
        s4v_log "training step ended (finished, or preempted and requeued: see RESULT_JSON above)"
    else
        s4v_log "training failed with status $rc"
    fi
    return "$rc"
}
