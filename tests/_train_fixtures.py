"""The tiny CPU training setting shared by the end-to-end and fault tests: shards and overrides."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from s4v.train.dist import free_port

from tests._video_fixtures import Spec, write_split

NUM_CLASSES = 6
CLASSES = [f"c{i}" for i in range(NUM_CLASSES)]  # the class list of the tiny splits' indices


def write_tiny_shards(root: Path) -> Path:
    """24 training clips (4 shards x 6, 12 frames, 32x32) and 8 val clips, labels in range."""
    for split, n_shards, per in (("train", 4, 6), ("val", 2, 4)):
        write_split(root, split, [[Spec(f"{split}{s}_{i}", 12, (s * per + i) % NUM_CLASSES, height=32, width=32)
                                   for i in range(per)] for s in range(n_shards)], classes=CLASSES)
    return root


def tiny_overrides(root, out, run, **extra) -> list[str]:
    """s4v_tiny, 32 px, 4 frames, batch 2, fp32 ZeRO-2, PyAV loader, 2 epochs, deterministic."""
    base = {"model.name": "s4v_tiny", "model.num_classes": NUM_CLASSES, "model.num_frames": 4,
            "model.backbone_dtype": "fp32", "data.root": str(root), "data.loader": "pyav",
            "data.num_frames": 4, "data.image_size": 32, "data.resize_short": 32, "data.batch_size": 2,
            "data.num_workers": 1, "data.min_shards_per_reader": 0, "data.shuffle_buffer": 8,
            "engine.ds_config": "ds_configs/zero2_fp32.json", "optim.lr": 1e-3, "optim.warmup_epochs": 0.5,
            "train.epochs": 2, "train.output_dir": str(out), "train.run_name": run,
            "train.log_every_steps": 1, "train.deterministic": True, "eval.at_end": False,
            "train.export": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run_dir) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    assert not twice, f"{run_dir}/metrics.jsonl logs steps {twice} more than once"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def python_cmd(nproc: int, *args: str, launcher_args: tuple[str, ...] = ()) -> list[str]:
    """`python <args>` in one process, or under torchrun in `nproc` ranks on 127.0.0.1 (a free port)."""
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *launcher_args, *args]


def result_json(stdout: str) -> dict:
    """The last `RESULT_JSON {...}` line that s4v train / eval print."""
    line = [x for x in stdout.splitlines() if x.startswith("RESULT_JSON ")][-1]
    return json.loads(line[len("RESULT_JSON "):])


REPO = Path(__file__).resolve().parents[1]


def run_train(args, nproc=1, timeout=300) -> dict:
    """`s4v train ARGS` on `nproc` ranks (CPU, gloo); asserts success and returns its RESULT_JSON."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(python_cmd(nproc, "-m", "s4v.train", *args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return result_json(proc.stdout)
