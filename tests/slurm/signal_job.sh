#!/usr/bin/env bash
# Test job for tests/test_slurm.py: runs a step through slurm/common.sh's s4v_srun whose tasks wait for
# SIGUSR1, so that a signal sent to the batch shell only (`scancel --batch -s USR1`) must be forwarded.
# READY_DIR (environment): each task creates READY_DIR/ready<rank> once its handler is installed.
#SBATCH --job-name=s4v-signal-test
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
set -euo pipefail
S4V_ROOT=${S4V_ROOT:-${SLURM_SUBMIT_DIR:?}}
# shellcheck source=slurm/common.sh
source "$S4V_ROOT/slurm/common.sh"

s4v_setup
s4v_srun python -c '
import os, signal, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
rank = os.environ["SLURM_PROCID"]
open(os.path.join(os.environ["READY_DIR"], "ready" + rank), "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.1)
print(f"task {rank} on {os.uname().nodename}:", "got SIGUSR1" if got else "no signal", flush=True)
'
