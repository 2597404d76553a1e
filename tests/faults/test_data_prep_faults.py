"""`data_prep` SIGKILLed mid-run and rerun: the final shard set equals an uninterrupted run's (same
shards, same bytes, same keys, no duplicates, no leftovers)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s4v.data.reader import index_tar

from ._common import REPO

pytestmark = pytest.mark.timeout(180)
ARGS = ["--train", "40", "--val", "0", "--size", "32", "--frames", "8", "--shard-size", "4", "--workers", "1",
        "--no-progress"]


def _cmd(out):
    return [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), *ARGS]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _shard_set(out: Path) -> dict:
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    keys = [s.key for name in sorted(files) if name.endswith(".tar") for s in index_tar(out / name)]
    return {"files": files, "keys": keys}


def test_killed_and_rerun_equals_uninterrupted(tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(_cmd(ref_out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(_cmd(out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / ".s4v-journal" / "train"
    deadline = time.time() + 60
    try:  # kill as soon as a few groups are finished: mid-run, usually mid-shard
        while time.time() < deadline and proc.poll() is None:
            if journal.is_dir() and len(list(journal.glob("0*.json"))) >= 3:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "data_prep finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    done = len(list(journal.glob("0*.json")))
    assert 3 <= done < 10 and not (out / "train-index.json").exists()

    rerun = subprocess.run(_cmd(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({10 - done} written, {done} already done)" in rerun.stdout, rerun.stdout

    a, b = _shard_set(ref_out), _shard_set(out)
    assert sorted(a["files"]) == sorted(b["files"])  # no leftover temporary or extra files
    assert a["files"] == b["files"]  # byte-identical tars, .idx files, index and rejects
    assert len(b["keys"]) == len(set(b["keys"])) == 40 and b["keys"] == a["keys"]
    index = json.loads((out / "train-index.json").read_text())
    assert index["num_samples"] == 40 and len(index["shards"]) == 10
