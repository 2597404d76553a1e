"""`make demo`: the whole system on the CPU in a few minutes.

1. `python -m data_prep.synthetic`: 3000 + 500 clips of the `pair4` task (two shapes; the label is the
   direction of their motion, so only the order of frames tells it), as VP9 WebDataset shards.
2. `s4v train` s4v_tiny with DeepSpeed, 2 processes on gloo, DALI decoding on the CPU.
3. The same training of a frame-averaging baseline: the same model with its temporal modelling off
   (no temporal convs, no CLS shift), i.e. per-frame features averaged over time.
4. One summary line: `RESULT val_top1=<x> frame_mean_top1=<y> run_dir=<path>`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "ds_configs/experiments/demo_tiny.yaml"
DATA = Path("runs/demo/data")
FRAME_MEAN = "model.overrides={side.temporal_kernel: 1, side.cls_shift: false}"
TARGET = 0.9  # the side network's val top-1 the demo is expected to reach


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_data() -> None:
    if (DATA / "train-index.json").is_file() and (DATA / "val-index.json").is_file():
        print(f"[demo] using the synthetic dataset in {DATA}")
        return
    print(f"[demo] making the synthetic pair4 dataset in {DATA} (about 30 s)")
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(DATA), "--codec", "vp9",
                    "--seed", "0"], check=True, env=_env(), cwd=REPO)


def train(run_name: str, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "s4v.train", CONFIG,
           f"data.root={DATA}", f"train.run_name={run_name}", *overrides]
    print("[demo] " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT_JSON "):
            result = json.loads(line[len("RESULT_JSON "):])
        elif not _is_noise(line):
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"[demo] training {run_name} failed (exit {proc.returncode}); see runs/demo/{run_name}")
    return result


def _is_noise(line: str) -> bool:
    """Warnings that say nothing to a demo user (CPU-only machine, deprecations inside DeepSpeed), and
    progress-bar redraws (only each epoch's final bar is shown)."""
    if "it/s" in line or "s/it" in line:
        return "100%|" not in line
    return any(s in line for s in ("FutureWarning", "warnings.warn", "No CUDA runtime", "UserWarning",
                                   "Setting OMP_NUM_THREADS", "*****", "[WARNING]", "[INFO]"))


def main() -> int:
    os.chdir(REPO)
    start = time.time()
    make_data()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    side = train(f"{stamp}-side")
    if side["val_top1"] < TARGET:
        # The synthetic task sometimes stalls on a partial solution (one motion axis learnt); a run
        # from another start usually gets past it. Both results are printed.
        print(f"[demo] the side network ended at {side['val_top1']:.3f} (< {TARGET}): a stalled run; "
              "retrying once with train.seed=1", flush=True)
        side = train(f"{stamp}-side-seed1", "train.seed=1")
    frame_mean = train(f"{stamp}-framemean", FRAME_MEAN)
    minutes = (time.time() - start) / 60
    print(f"\n[demo] done in {minutes:.1f} min. Side4Video top-1 {side['val_top1']:.3f}; frame-averaging "
          f"baseline top-1 {frame_mean['val_top1']:.3f} (chance 0.25).")
    if side["val_top1"] < TARGET:
        print(f"[demo] note: the side network stayed below {TARGET} this time; the synthetic task has a long "
              "plateau before it takes off and can stall (try train.seed=2 in the demo config).")
    print("[demo] TensorBoard: .venv/bin/tensorboard --logdir runs/demo  (then open http://127.0.0.1:6006)")
    print(f"RESULT val_top1={side['val_top1']:.4f} frame_mean_top1={frame_mean['val_top1']:.4f} "
          f"run_dir={side['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
