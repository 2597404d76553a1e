"""Process-group set-up from torchrun or Slurm variables, rank helpers, and preemption signals."""
from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_slurm() -> None:
    """Under `srun` (one task per GPU) derive torchrun's variables from Slurm's, unless already set."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", ""))
        os.environ["MASTER_ADDR"] = first_host(nodelist) if nodelist else "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        host = out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        host = nodelist.split(",")[0].split("[")[0]
    try:  # a Slurm node name may not resolve the same way for NCCL; use its address
        return socket.gethostbyname(host)
    except OSError:
        return host


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed (env:// rendezvous) when launched by torchrun/srun; a single process
    otherwise. `backend` "auto" picks NCCL on CUDA and gloo on CPU."""
    env_from_slurm()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not dist.is_initialized():
        backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        if world == 1:  # a group of one, so DeepSpeed needs no launcher (and never tries MPI)
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local_rank, device)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum_(flags: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks in place (one collective; it must be on the device the backend
    uses) and return it."""
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return flags


def all_gather_object(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's `--signal=USR1@...` before the time limit); the loop checks it at
    step boundaries, agrees on it across ranks, checkpoints and requeues."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        # A signal that arrived while the job was still starting (see `buffer_preemption_signals`).
        self.signum: int | None = next(iter(sorted(_SIGNALS_RECEIVED)), None)
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %s: will checkpoint and stop at the next step", signal.Signals(signum).name)
        self.signum = signum
        _SIGNALS_RECEIVED.add(signum)

    @property
    def local(self) -> bool:
        """This process got the signal (the loop sums this over ranks with its other per-step flags)."""
        return self.signum is not None

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got the signal."""
        return all_reduce_max(1.0 if self.signum is not None else 0.0) > 0


# Signals this process got through a PreemptionFlag: a SIGTERM alone (`scancel`, a time limit reached
# without the USR1 warning, Slurm's own preemption) must not requeue the job.
_SIGNALS_RECEIVED: set[int] = set()


def buffer_preemption_signals(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Called first thing at start-up: a preemption signal that comes while the model and data are
    still being built (minutes for E/14) is remembered instead of killing the rank; the training
    loop's PreemptionFlag then acts on it at the first step."""
    def remember(signum, frame) -> None:
        _SIGNALS_RECEIVED.add(signum)

    for sig in signals:
        signal.signal(sig, remember)


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` from rank 0; returns whether a requeue was issued.

    Not after a SIGTERM without a SIGUSR1: that is `scancel` (Slurm requeues even a cancelled job, so
    a requeue here would undo the cancel), or Slurm's own preemption, which requeues by itself when
    configured to; the checkpoint is saved either way."""
    if signal.SIGTERM in _SIGNALS_RECEIVED and signal.SIGUSR1 not in _SIGNALS_RECEIVED:
        log.warning("stopped by SIGTERM (scancel, preemption or time limit): checkpoint saved, job not requeued")
        return False
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job
              else os.environ.get("SLURM_JOB_ID"))
    if not job_id:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        log.warning("requeued Slurm job %s", job_id)
        return True
    except (OSError, subprocess.SubprocessError) as err:
        log.error("could not requeue Slurm job %s: %s", job_id, err)
        return False
