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

from data_prep.writer import STOP_ENV
from s4v.data.format import SplitIndex
from s4v.data.reader import index_tar
from tests._video_fixtures import encode_clip

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


# --- `--overwrite` never loses the existing split (issue 13, item 8)
def _tree(root: Path, clip: bytes, names: dict[str, int]) -> Path:
    for cls, n in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{cls}{i}.mp4").write_bytes(clip)
    return root


def _shard(videos: Path, out: Path, *extra: str) -> int:
    from data_prep import shard

    return shard.main(["--dataset", "folder", "--videos", str(videos), "--split", "train", "--out", str(out),
                       "--shard-size", "1", "--short-side", "0", "--min-frames", "1", "--workers", "1",
                       "--no-progress", "--classes", str(videos.parent / "classes.txt"), *extra])


def _split_state(out: Path) -> dict:
    """Every file of the split outside the staging area, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".s4v-staging" not in p.parts}


@pytest.fixture
def made(tmp_path):
    clip = encode_clip(6, height=32, width=32)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    out = tmp_path / "out"
    assert _shard(_tree(tmp_path / "old", clip, {"cat": 2, "dog": 1}), out) == 0
    return out, clip, _split_state(out)


def test_overwrite_with_empty_or_all_rejected_input_keeps_the_old_split(made, tmp_path, capsys):
    out, clip, before = made
    empty = _tree(tmp_path / "empty", clip, {"cat": 0, "dog": 0})
    assert _shard(empty, out, "--overwrite") == 2  # was: old shards deleted, a 0-sample index, exit 0
    assert "split 'train' has no input records: nothing written" in capsys.readouterr().err
    assert _split_state(out) == before

    broken = tmp_path / "broken"
    (broken / "cat").mkdir(parents=True)
    (broken / "cat" / "bad.mp4").write_bytes(b"not a video")
    assert _shard(broken, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "every input was rejected (1 cannot open" in err and "nothing replaced" in err
    assert _split_state(out) == before
    assert SplitIndex.load(out, "train").num_samples == 3

    fresh = tmp_path / "fresh"
    assert _shard(broken, fresh) == 2 and not (fresh / "train-index.json").exists()
    assert _shard(empty, fresh) == 2


def test_overwrite_replaces_the_split_only_when_complete(made, tmp_path, monkeypatch):
    out, _, before = made
    new = _tree(tmp_path / "new", encode_clip(9, height=32, width=32), {"dog": 2})
    monkeypatch.setenv(STOP_ENV, "1")
    assert _shard(new, out, "--overwrite") == 3  # interrupted after one of the two new shards
    assert _split_state(out) == before and SplitIndex.load(out, "train").num_samples == 3
    monkeypatch.delenv(STOP_ENV)
    assert _shard(new, out, "--overwrite") == 0  # resumes the staged split, then swaps it in
    index = SplitIndex.load(out, "train")
    assert index.num_samples == 2 and index.class_counts() == {1: 2}
    assert sorted(p.name for p in out.glob("train-*")) == [
        "train-000000.idx", "train-000000.tar", "train-000001.idx", "train-000001.tar", "train-index.json",
        "train-rejects.jsonl"]  # no stale third shard of the old split
    assert not (out / ".s4v-staging").exists()
    assert sorted(p.name for p in (out / ".s4v-journal" / "train").iterdir()) == ["000000.json", "000001.json",
                                                                               "plan.json"]
    assert _shard(new, out) == 0  # a plain rerun is a no-op on the new split



def test_split_files_do_not_match_a_longer_split_name(tmp_path):
    """Overwriting split `train` must not touch the shards of a split named `train-1k`."""
    from data_prep.staging import split_files

    for name in ("train-000000.tar", "train-000001-02.tar", "train-000000.idx", "train-rejects.jsonl",
                 "train-1k-000000.tar", "train-1k-000000.idx", "train-index.json"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in split_files(tmp_path, "train")] == [
        "train-000000.idx", "train-000000.tar", "train-000001-02.tar", "train-rejects.jsonl"]


def test_a_second_task_finding_the_split_replaced_does_nothing(tmp_path):
    """Two tasks of a job array may both see every group done: the second, under the lock, finds the
    split already replaced and leaves it alone."""
    from data_prep.staging import replace_split, staging_dir

    out = tmp_path / "out"
    staged = staging_dir(out, "train")
    staged.mkdir(parents=True)
    (staged / "train-000000.tar").write_bytes(b"new")
    (staged / ".s4v-journal" / "train").mkdir(parents=True)
    (staged / "train-index.json").write_text("{}")
    (out / "train-000000.tar").write_bytes(b"old")
    assert replace_split(staged, out, "train") == out / "train-index.json"
    assert replace_split(staged, out, "train") == out / "train-index.json"  # the late task
    assert (out / "train-000000.tar").read_bytes() == b"new" and (out / "train-index.json").is_file()
