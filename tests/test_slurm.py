"""The Slurm scripts, run unchanged with `sbatch` on a real 2-node Slurm cluster on this machine.

tests/slurm/cluster.sh starts the cluster (loopback only, fake GPUs; it installs Slurm with apt-get if
needed). Jobs run the tiny model on tiny shards on the CPU: fake GPU devices leave torch.cuda
unavailable, so the ranks use gloo, and DeepSpeed uses its CPU accelerator (DS_ACCELERATOR=cpu in the
environment the jobs inherit). Only sbatch options (before the script) and config overrides (after it)
differ from a real submission.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests._train_fixtures import losses, tiny_overrides, write_tiny_shards
from tests._video_fixtures import encode_clip

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
TOTAL_STEPS = 24  # 4 epochs x (24 clips / 2 ranks / batch 2)
# One task per node on both nodes, one fake GPU each; the rest of the script's #SBATCH lines stay.
SBATCH_2X1 = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=20"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class Cluster:
    def __init__(self, path: Path):
        self.path = path
        self.env = dict(os.environ, SLURM_CONF=str(path / "slurm.conf"), DS_ACCELERATOR="cpu",
                        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        # The jobs use this interpreter's environment (the scripts default to $SLURM_SUBMIT_DIR/.venv) and,
        # like the scripts, put its bin folder first on PATH.
        self.env["S4V_VENV"] = sys.prefix if sys.prefix != sys.base_prefix else "none"
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env['PATH']}"
        # DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op on first use (about 70 s of CPU).
        # Its own build folder: ninja rebuilds everything when a build folder is shared with processes
        # that find another ninja on PATH (e.g. /usr/bin/ninja 1.11 vs the venv's 1.13).
        base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or REPO / ".cache" / "torch_extensions")
        self.env["TORCH_EXTENSIONS_DIR"] = str(base / "slurm-tests")
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(var, None)

    def run(self, *cmd: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, **kw)

    def sbatch(self, *args: str, env: dict | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env or self.env,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty if Slurm has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), timeout=15)
        if proc.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)

    def wait(self, job_id: int | str, timeout: float, log: Path | None = None, until=None) -> dict[str, str]:
        """Poll every 0.5 s until the job is in a final state (or `until(info)` is true)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if (until and until(info)) or (until is None and state in FINAL_STATES):
                return info
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id))
                pytest.fail(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s\n{tail(log)}")
            time.sleep(0.5)

    def stop(self) -> None:
        subprocess.run([str(CLUSTER_SH), "stop", str(self.path)], capture_output=True, text=True, timeout=120)


def tail(path: Path | None, n: int = 6000) -> str:
    if path is None or not path.is_file():
        return f"(no log {path})"
    return path.read_text(errors="replace")[-n:]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (slurmd, unshare, mount, apt-get)")
    for tool in ("unshare", "setsid", "runuser", "mknod"):
        if shutil.which(tool) is None:
            pytest.skip(f"the Slurm test cluster needs {tool}")
    # Not under pytest's tmp_path: the munge user must reach the socket (pytest's dirs are 0700).
    path = Path(tempfile.mkdtemp(prefix="s4v-slurm-", dir="/tmp"))
    c = Cluster(path)
    try:
        proc = subprocess.run([str(CLUSTER_SH), "start", str(path), "--owner", str(os.getpid())],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        c.stop()
        pytest.fail("tests/slurm/cluster.sh start took more than 600 s")
    if proc.returncode == 3:
        c.stop()
        pytest.skip(f"could not install Slurm with apt-get: {proc.stderr[-500:]}")
    if proc.returncode != 0:
        c.stop()
        pytest.fail(f"tests/slurm/cluster.sh start failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    try:
        yield c
    finally:
        c.stop()
        leftover = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).find(str(path)) >= 0]
        shutil.rmtree(path, ignore_errors=True)
        assert not leftover, f"processes left after stopping the cluster: {[_cmdline(p) for p in leftover]}"


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("slurm_shards"))


def slurm_overrides(shards: Path, out: Path) -> list[str]:
    """The e2e tests' tiny CPU run (tests/_train_fixtures.py) on top of the ViT-E/14 recipe, with a global
    batch of 2 nodes x 2 clips. No run name (null): the scripts' default `<model>-job<SLURM_JOB_ID>` is what a
    requeued job resumes from."""
    return tiny_overrides(shards, out, "null", **{"model.pretrained": "null", "model.grad_checkpointing": "false",
                                                  "train.epochs": 4, "eval.every_epochs": 0, "train.export": "true",
                                                  "train.global_batch_size": 4})


def results(log: Path) -> list[dict]:
    """Every rank's RESULT_JSON line (a progress bar may share its line: tqdm ends lines with CR)."""
    return [json.loads(m) for m in re.findall(r"RESULT_JSON (\{[^\n\r]*\})", log.read_text(errors="replace"))]


def metric_rows(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.fixture(scope="module")
def ds_ops(cluster):
    """Build DeepSpeed's CPU comm op once, before the jobs (whose ranks would otherwise wait for it)."""
    code = ("try:\n    from deepspeed.comm.torch import build_shm_op\nexcept ImportError:\n    build_shm_op = None\n"
            "if build_shm_op is not None:\n    build_shm_op()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, ds_ops, tmp_path_factory):
    """slurm/train_vite_k400.sh, unchanged, on 2 nodes: the reference run."""
    out = tmp_path_factory.mktemp("slurm_train")
    job = cluster.sbatch(*SBATCH_2X1, f"--output={out}/%x-%j.out", "slurm/train_vite_k400.sh",
                         *slurm_overrides(shards, out))
    log = out / f"s4v-e14-k400-{job}.out"
    info = cluster.wait(job, timeout=240, log=log)
    return job, info, log, out / f"s4v_tiny-job{job}"


def test_train_script_runs_on_two_nodes(uninterrupted):
    job, info, log, run_dir = uninterrupted
    text = tail(log, 100_000)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["Restarts"] == "0"
    assert "node[1-2]: 2 node(s) x 1 task(s)" in text and "SLURM_RESTART_COUNT): 0" in text
    res = results(log)
    # only rank 0 prints its result
    assert len(res) == 1 and all(r["status"] == "finished" and r["step"] == TOTAL_STEPS for r in res), res
    assert Path(res[0]["run_dir"]) == run_dir  # default run name from the job id
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 4  # 2 ranks x 2 clips
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert tag == f"step_{TOTAL_STEPS:08d}" and (ckpt / tag / "COMPLETE").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(losses(run_dir)) == list(range(1, TOTAL_STEPS + 1))
    # S4V_SBATCH_SCRIPT: the run dir keeps the batch script as submitted
    assert (run_dir / "sbatch_script.sh").read_text() == (REPO / "slurm" / "train_vite_k400.sh").read_text()
    command = (run_dir / "command.txt").read_text()
    assert f"SLURM_JOB_ID={job}" in command and "SLURM_NTASKS=2" in command


def test_eval_script_evaluates_the_run_over_both_nodes(cluster, uninterrupted):
    _, ref_info, _, run_dir = uninterrupted
    assert ref_info["JobState"] == "COMPLETED", "the training run failed"
    assert (run_dir / "model_side_head.pt").is_file()
    out = run_dir.parent
    job = cluster.sbatch(*SBATCH_2X1, f"--output={out}/%x-%j.out", "slurm/eval.sh", str(run_dir))
    log = out / f"s4v-eval-{job}.out"
    info = cluster.wait(job, timeout=180, log=log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["num_samples"] == 8 and report["views"] == "3 crops x 4 clips"  # the recipe's views
    assert results(log) == [{k: report[k] for k in report}]  # rank 0 prints it


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, shards, uninterrupted, tmp_path):
    """SIGUSR1 to the job's tasks, as `--signal=USR1@300` sends it before the time limit: the run
    checkpoints, rank 0 requeues the job, the requeued job resumes and ends like an uninterrupted run."""
    ref_job, ref_info, _, ref_dir = uninterrupted
    assert ref_info["JobState"] == "COMPLETED", "the reference run failed"
    job = cluster.sbatch(*SBATCH_2X1, f"--output={tmp_path}/%x-%j.out", "slurm/train_vite_k400.sh",
                         *slurm_overrides(shards, tmp_path))
    log = tmp_path / f"s4v-e14-k400-{job}.out"
    run_dir = tmp_path / f"s4v_tiny-job{job}"
    # Training has started (so the handlers are installed) once rank 0 logged a few steps.
    cluster.wait(job, timeout=180, log=log,
                 until=lambda i: metric_rows(run_dir) >= 3 or i.get("JobState") in FINAL_STATES)
    assert metric_rows(run_dir) >= 3, tail(log)
    # Without --batch/--full, scancel signals the job steps' tasks (not the batch shell), like --signal=USR1@T
    sig = cluster.run("scancel", "--signal=USR1", str(job))
    assert sig.returncode == 0, sig.stderr
    cluster.wait(job, timeout=60, log=log, until=lambda i: int(i.get("Restarts", 0)) >= 1
                 or i.get("JobState") in FINAL_STATES)
    info = cluster.wait(job, timeout=240, log=log)
    text = tail(log, 200_000)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["Restarts"] == "1", text[-6000:]
    assert "received signal SIGUSR1" in text and f"requeued Slurm job {job}" in text
    assert "SLURM_RESTART_COUNT): 0" in text and "SLURM_RESTART_COUNT): 1" in text  # one log, appended
    res = results(log)
    preempted = [r for r in res if r["status"] == "preempted"]
    finished = [r for r in res if r["status"] == "finished"]
    assert len(preempted) == 1 and len(finished) == 1, res  # rank 0's result before and after the requeue
    stop_step = preempted[0]["step"]
    assert 0 < stop_step < TOTAL_STEPS
    assert re.search(rf"resumed from \S+ at epoch \d+, step {stop_step}\b", text), text[-6000:]
    assert all(r["step"] == TOTAL_STEPS and Path(r["run_dir"]) == run_dir for r in finished)
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{TOTAL_STEPS:08d}" and (run_dir / "checkpoints" / tag / "COMPLETE").is_file()
    # The same losses, step by step, as the uninterrupted job's
    a, b = losses(ref_dir), losses(run_dir)
    assert sorted(b) == sorted(a) == list(range(1, TOTAL_STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


def test_batch_shell_forwards_usr1_to_the_tasks(cluster, tmp_path):
    """`--signal=B:USR1@T` or `scancel --batch -s USR1` signal only the batch shell: slurm/common.sh
    passes the signal on to the srun step."""
    env = dict(cluster.env, READY_DIR=str(tmp_path))
    job = cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "tests/slurm/signal_job.sh", env=env)
    log = tmp_path / f"s4v-signal-test-{job}.out"
    cluster.wait(job, timeout=60, log=log, until=lambda i: (tmp_path / "ready0").exists()
                 and (tmp_path / "ready1").exists() or i.get("JobState") in FINAL_STATES)
    sig = cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    assert sig.returncode == 0, sig.stderr
    info = cluster.wait(job, timeout=60, log=log)
    text = tail(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "batch shell got SIGUSR1" in text
    assert "task 0 on node1: got SIGUSR1" in text and "task 1 on node2: got SIGUSR1" in text, text


def test_data_prep_array_shards_in_parts_and_merges_the_index(cluster, tmp_path):
    """slurm/data_prep_array.sh as a 2-task array: each task writes its own shard groups (the shard
    tool reads SLURM_ARRAY_TASK_ID/COUNT), and the last one to finish writes the split index."""
    videos = tmp_path / "videos"
    clip = encode_clip(12, height=32, width=32)
    for cls in ("cat", "dog"):
        (videos / cls).mkdir(parents=True)
        for i in range(2):
            (videos / cls / f"{cls}{i}.mp4").write_bytes(clip)
    out = tmp_path / "shards"
    job = cluster.sbatch("--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out",
                         "slurm/data_prep_array.sh", "--dataset", "folder", "--videos", str(videos),
                         "--split", "train", "--out", str(out), "--shard-size", "1", "--short-side", "32",
                         "--no-progress")
    logs = [tmp_path / f"s4v-shard-{job}_{t}.out" for t in (0, 1)]
    for t in (0, 1):
        info = cluster.wait(f"{job}_{t}", timeout=120, log=logs[t])
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(logs[t])
    texts = [tail(logs[t]) for t in (0, 1)]
    for t, text in enumerate(texts):
        assert f"part {t} of 2" in text, text
        assert "split train: 2 samples" in text and "in 2 shard groups (2 written" in text, text
    assert sum("index: " in text for text in texts) >= 1, texts  # written by the last one to finish
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{g:06d}.tar" for g in range(4)]
    index = json.loads((out / "train-index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [1, 1, 1, 1]


def test_extract_script_covers_every_file_once_over_both_nodes(cluster, uninterrupted, tmp_path):
    """slurm/extract.sh, unchanged, on 2 nodes with the trained run: each task extracts its own parts,
    and the index lists every video once with its features."""
    from s4v.infer.extract import load_index

    _, ref_info, _, run_dir = uninterrupted
    assert ref_info["JobState"] == "COMPLETED", "the training run failed"
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        (videos / f"v{i}.mp4").write_bytes(encode_clip(6 + i, height=32, width=40))
    out = tmp_path / "feats"
    job = cluster.sbatch(*SBATCH_2X1, f"--output={tmp_path}/%x-%j.out", "slurm/extract.sh", str(run_dir),
                         str(videos), "--out", str(out), "--part-size", "1")
    log = tmp_path / f"s4v-extract-{job}.out"
    info = cluster.wait(job, timeout=180, log=log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    index, feats = load_index(out)
    assert sorted(v["path"] for v in index["videos"]) == sorted(str(p) for p in videos.glob("*.mp4"))
    assert len(feats) == 5 and not index.get("errors")
