"""Test-only entry point: `python -m tests.faults.faulty_train [s4v train args]`, i.e. `s4v train` with
fault hooks switched on by environment variables (each a no-op when unset):

- S4V_FAULT_KEYLOG=DIR: every rank appends one JSON line per micro-batch to DIR/keys_rank{R}.jsonl
  (epoch, step about to run, valid sample keys), and writes its pid to DIR/pid_rank{R}.
- S4V_FAULT_KILL="RANK:STEP": that rank SIGKILLs itself at the start of optimizer step STEP (1-based),
  after writing the time of the kill to DIR/killed_at (DIR = S4V_FAULT_KEYLOG, or the cwd).
- S4V_FAULT_USR1="RANK:STEP": that rank sends itself SIGUSR1 at the start of step STEP (preemption).
- S4V_FAULT_NAN="3,5-7": the recognition loss is NaN in those optimizer-step attempts of this process
  (1-based, skipped ones included: a skipped update does not advance the step counter).
- S4V_FAULT_NAN_RANK="R": S4V_FAULT_NAN applies on rank R only (default: every rank).
- S4V_FAULT_CKPT="MODE:STEP" (MODE kill | enospc): while checkpoint step_STEP is being written (in its
  temporary folder `step_STEP.tmp-*`), kill: the first file is written half-way, then the process
  SIGKILLs itself; enospc: DeepSpeed's own save writes the first file onto a full device (/dev/full),
  so the error is the one a full disk gives (torch's RuntimeError).
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path


def _pair(name: str):
    v = os.environ.get(name)
    if not v:
        return None
    a, b = v.split(":")
    return a, int(b)


def _steps(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def install() -> None:
    from s4v.train import loop, tasks

    rank = int(os.environ.get("RANK", "0"))
    logdir = Path(os.environ.get("S4V_FAULT_KEYLOG") or ".")
    keylog = bool(os.environ.get("S4V_FAULT_KEYLOG"))
    if keylog:
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / f"pid_rank{rank}").write_text(str(os.getpid()))
    kill, usr1 = _pair("S4V_FAULT_KILL"), _pair("S4V_FAULT_USR1")
    nan = _steps(os.environ.get("S4V_FAULT_NAN", ""))
    if os.environ.get("S4V_FAULT_NAN_RANK", str(rank)) != str(rank):
        nan = set()
    ckpt = _pair("S4V_FAULT_CKPT")

    orig_step = loop.Trainer.micro_step

    def micro_step(self, batch, last):
        step = self.step + 1  # the optimizer step this micro-batch belongs to
        if keylog:
            keys = [k for k, v in zip(batch["key"], batch["valid"].tolist()) if v]
            with open(logdir / f"keys_rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"epoch": self.epoch, "step": step, "keys": keys}) + "\n")
        if kill and int(kill[0]) == rank and step == kill[1]:
            (logdir / "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        if usr1 and int(usr1[0]) == rank and step == usr1[1]:
            os.kill(os.getpid(), signal.SIGUSR1)
        return orig_step(self, batch, last)

    loop.Trainer.micro_step = micro_step

    if nan:
        orig_loss = tasks.RecognitionTask.loss
        micro_batches = [0]  # of this process; a skipped update does not advance trainer.step

        def loss(self, trainer, batch):
            attempt = micro_batches[0] // trainer.plan.grad_accum + 1  # optimizer steps tried, skipped included
            micro_batches[0] += 1
            out = orig_loss(self, trainer, batch)
            return out * float("nan") if attempt in nan else out

        tasks.RecognitionTask.loss = loss

    if ckpt:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        import torch
        from s4v.train.checkpoint import tag_for

        mode, tag = ckpt[0], tag_for(ckpt[1])
        orig_save = TorchCheckpointEngine.save

        def save(self, state_dict, path):
            in_tag = f"/{tag}/" in str(path) or f"/{tag}.tmp-" in str(path)  # written aside, renamed when complete
            if in_tag and mode == "enospc":
                os.symlink("/dev/full", path)  # every write fails with ENOSPC, as on a full disk
                return orig_save(self, state_dict, path)
            if in_tag:
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                with open(path, "wb") as f:  # a partial file, as a crash or a full disk leaves it
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_save(self, state_dict, path)

        TorchCheckpointEngine.save = save


def main() -> int:
    from s4v.train.main import main as train_main
    from s4v.train.dist import buffer_preemption_signals

    buffer_preemption_signals()
    install()
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
