#!/usr/bin/env bash
# s4v_e14 (EVA-02 CLIP ViT-E/14 tower) on Kinetics-400, 8 frames, across nodes: one task per GPU.
#
#   cd /path/to/s4v && sbatch slurm/train_vite_k400.sh [key=value ...]
#
# Arguments are config overrides (e.g. data.root=/scratch/k400 train.epochs=30); S4V_CONFIG=other.yaml
# picks another recipe. Any #SBATCH line can be overridden on the command line, e.g.
# `sbatch --nodes=1 --time=12:00:00 slurm/train_vite_k400.sh`. Submit from the s4v checkout (or set
# S4V_ROOT); the venv is $S4V_ROOT/.venv unless S4V_VENV says otherwise. See slurm/common.sh.
#
# The recipe's global batch is 64 videos (train.global_batch_size). On 2 nodes x 8 GPUs this script runs
# 4 per GPU (data.batch_size=4); on fewer GPUs the accumulation is derived so the global batch stays 64
# (e.g. --nodes=1: data.batch_size=8, or 4 with 2 micro-batches per step). An indivisible choice is refused
# at start with the batch sizes that work.
#
# GPUs with little memory: model.shard_backbone=true splits the frozen 8.7 GB bf16 tower over the 8 GPUs
# of each node (about 1.1 GB each; see docs/performance.md), model.grad_checkpointing=true is already on.
#
# Preemption and time limits: Slurm sends SIGUSR1 to the tasks 300 s before the time limit
# (--signal=USR1@300; SIGTERM from a preemption works the same). The run saves a checkpoint at the next
# step, rank 0 requeues this job (`scontrol requeue`), and the requeued job (same job id, so the same run
# dir runs/s4v_e14-job<id>) resumes from it. The log is appended to (--open-mode=append).
#
# Log: <job name>-<job id>.out in the submit folder (Slurm opens it before the script runs and does
# not create folders, so a logs/ path would fail the job if logs/ were missing). To collect logs in a
# folder: `mkdir -p logs && sbatch --output=logs/%x-%j.out slurm/train_vite_k400.sh`.
#
#SBATCH --job-name=s4v-e14-k400
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
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
s4v_train "${S4V_CONFIG:-ds_configs/experiments/k400_e14_f8.yaml}" data.batch_size=4 "$@"
