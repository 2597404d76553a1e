"""Shared helpers of the fault-injection tests: tiny shards, the e2e override set, and launching
`tests.faults.faulty_train` (s4v train + fault hooks) in 1 or 2 CPU ranks with a hard timeout."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests._train_fixtures import python_cmd, result_json, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def overrides(root, out, run, **extra) -> list[str]:
    """The tiny setting of tests/_train_fixtures.py, one epoch, no evaluation."""
    return tiny_overrides(root, out, run, **{"train.epochs": 1, "eval.every_epochs": 0, **extra})


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, ended: float):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.ended = ended

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def result(self) -> dict:
        assert "RESULT_JSON " in self.stdout, f"no RESULT_JSON (rc {self.returncode}):\n{self.tail()}"
        return result_json(self.stdout)

    def tail(self, n: int = 3000) -> str:
        return self.stdout[-n:] + "\n--- stderr ---\n" + self.stderr[-n:]


def launch(args: list[str], nproc: int = 1, faults: Optional[dict] = None, timeout: float = 120) -> Run:
    """Run s4v train (with the fault hooks of faulty_train) in `nproc` CPU ranks; never waits longer
    than `timeout` (subprocess.TimeoutExpired fails the test)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in list(env):
        if k.startswith("S4V_FAULT_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            del env[k]
    env.update(faults or {})
    cmd = python_cmd(nproc, "-m", "tests.faults.faulty_train", *args,
                     launcher_args=("--monitor_interval", "0.5"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(proc, time.time())


def ckpt_dir(out: Path, run: str) -> Path:
    return Path(out) / run / "checkpoints"


def final_weights(ckpt: Path, tag: Optional[str] = None) -> dict:
    """fp32 master weights (ZeRO partitions merged) plus BatchNorm buffers of a checkpoint."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from s4v.train.checkpoint import latest_tag

    tag = tag or latest_tag(ckpt)
    sd = {k: v.detach().float().clone() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}
    module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    sd.update({k: v.detach().float() for k, v in module.items() if "running" in k})
    return sd


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    import torch

    assert sorted(a) == sorted(b)
    worst = max((float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()), default=0.0)
    assert worst <= atol, f"weights differ by up to {worst}"
    assert all(torch.isfinite(v).all() for v in a.values())


def read_keylog(logdir: Path) -> dict[int, list[dict]]:
    out = {}
    for path in sorted(Path(logdir).glob("keys_rank*.jsonl")):
        rank = int(path.stem.removeprefix("keys_rank"))
        out[rank] = [json.loads(x) for x in path.read_text().splitlines()]
    return out
