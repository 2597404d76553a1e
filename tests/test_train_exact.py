"""Training stays exact at any scale (CPU, DeepSpeed on gloo): gradient accumulation counts optimizer
updates and resumes (after an interruption or a preemption) to the losses of an uninterrupted run; the
global batch derives the accumulation; a checkpoint of N ranks resumes on M ranks with every sample of
the epoch trained exactly once (sample lineage, `train.log_samples`)."""
from collections import Counter
from pathlib import Path

import pytest

from s4v.train.lineage import read_lineage
from tests._train_fixtures import losses, run_train, tiny_overrides, write_tiny_shards
from tests.faults._common import launch

pytestmark = pytest.mark.slow

# 24 clips, batch 2, global batch 8: 2 ranks x accumulation 2, or 1 rank x accumulation 4; 3 steps an epoch
ACCUM = {"train.global_batch_size": 8, "train.log_samples": True, "eval.every_epochs": 0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    return run_train(tiny_overrides(shards, tmp_path_factory.mktemp("full"), "full", **ACCUM), nproc=2)


def _epoch_keys(run_dir) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for row in read_lineage(Path(run_dir)):
        out.setdefault(row["epoch"], Counter()).update(row["keys"])
    return out


def _assert_every_sample_once(run_dir, epochs):
    per_epoch = _epoch_keys(run_dir)
    assert sorted(per_epoch) == list(epochs)
    for epoch, keys in per_epoch.items():
        assert len(keys) == 24 and set(keys.values()) == {1}, (epoch, keys)


def _assert_same_losses(a_dir, b_dir, steps):
    a, b = losses(a_dir), losses(b_dir)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


def test_accumulation_counts_optimizer_steps(uninterrupted):
    res = uninterrupted
    assert res["grad_accum"] == 2 and res["world_size"] == 2 and res["micro_batch"] == 2
    assert res["step"] == 6 and res["ds_optimizer_steps"] == 6  # 2 epochs x 3 optimizer steps
    run_dir = Path(res["run_dir"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    rows = read_lineage(run_dir)
    assert Counter(r["step"] for r in rows) == {s: 4 for s in range(1, 7)}  # 2 ranks x 2 micro-batches a step
    assert {r["micro"] for r in rows} == {0, 1}
    _assert_every_sample_once(run_dir, [0, 1])


def test_accumulation_resume_mid_epoch_gives_the_same_losses(shards, tmp_path, uninterrupted):
    part = run_train(tiny_overrides(shards, tmp_path, "resumed", **ACCUM, **{"train.max_steps": 2}), nproc=2)
    assert part["step"] == 2 and part["ds_optimizer_steps"] == 2
    rest = run_train(tiny_overrides(shards, tmp_path, "resumed", **ACCUM), nproc=2)
    assert rest["step"] == rest["ds_optimizer_steps"] == 6
    _assert_same_losses(uninterrupted["run_dir"], rest["run_dir"], 6)
    _assert_every_sample_once(rest["run_dir"], [0, 1])


def test_accumulation_resume_after_preemption_gives_the_same_losses(shards, tmp_path, uninterrupted):
    """SIGUSR1 reaches rank 1 in the first micro-batch of step 2: the ranks agree at the end of the
    window, checkpoint at step 2 (not mid-window) and stop; the rerun continues exactly."""
    args = tiny_overrides(shards, tmp_path, "preempted", **ACCUM)
    first = launch(args, nproc=2, faults={"S4V_FAULT_USR1": "1:2"}, timeout=300)
    res = first.result()
    assert res["status"] == "preempted" and res["step"] == 2 == res["ds_optimizer_steps"], first.tail()
    rest = launch(args, nproc=2, timeout=300).result()
    assert rest["status"] == "finished" and rest["step"] == 6
    _assert_same_losses(uninterrupted["run_dir"], rest["run_dir"], 6)
    _assert_every_sample_once(rest["run_dir"], [0, 1])


@pytest.mark.parametrize("stage,before,after", [(2, 2, 1), (3, 1, 2), (3, 2, 1), (2, 1, 2)])
def test_elastic_resume_trains_every_sample_once(shards, tmp_path, stage, before, after):
    """A checkpoint written by `before` ranks mid-epoch resumes on `after` ranks: the same global batch
    (the accumulation re-derived), the schedule by optimizer step, and the rest of the epoch dealt over
    the new ranks with no sample twice and none left out."""
    common = {**ACCUM, "engine.ds_config": f"ds_configs/zero{stage}_fp32.json", "train.epochs": 1}
    part = run_train(tiny_overrides(shards, tmp_path, "elastic", **common, **{"train.max_steps": 1}), nproc=before)
    assert part["step"] == 1 and part["world_size"] == before
    rest = run_train(tiny_overrides(shards, tmp_path, "elastic", **common), nproc=after)
    assert rest["world_size"] == after and rest["grad_accum"] == 4 // after
    assert rest["status"] == "finished" and rest["step"] == rest["ds_optimizer_steps"] == 3
    _assert_every_sample_once(rest["run_dir"], [0])
    assert sorted(losses(rest["run_dir"])) == [1, 2, 3]


def test_resume_with_another_global_batch_or_class_list_is_refused(shards, tmp_path, uninterrupted):
    """A checkpoint continues the same optimisation on the same labels, or the run stops at resume (rc 2)."""
    import json
    import shutil
    import subprocess

    from tests._train_fixtures import REPO, python_cmd

    def resume(root, **extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        shutil.copytree(uninterrupted["run_dir"], out / "full")
        args = tiny_overrides(root, out, "full", **{**ACCUM, "train.epochs": 3, **extra})
        return subprocess.run(python_cmd(1, "-m", "s4v.train", *args), cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})

    proc = resume(shards, **{"train.global_batch_size": 4})
    assert proc.returncode == 2 and "trained with a global batch of 8 samples" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "built successfully" not in proc.stdout  # DeepSpeed's print at engine start is kept out
    renamed = tmp_path / "renamed"
    shutil.copytree(shards, renamed)
    index = json.loads((renamed / "train-index.json").read_text())
    index["classes"] = list(reversed(index["classes"]))
    (renamed / "train-index.json").write_text(json.dumps(index))
    proc = resume(renamed)
    assert proc.returncode == 2 and "another class list" in proc.stderr and "label 0 is" in proc.stderr, proc.stderr[-2000:]


def test_restart_after_a_crash_before_any_checkpoint_logs_each_step_once(shards, tmp_path, uninterrupted):
    """Rank 0 is killed at step 2 of the first epoch, before any checkpoint: the rerun starts fresh, and
    the crashed attempt's metric rows and sample lineage are dropped instead of doubled."""
    args = tiny_overrides(shards, tmp_path, "crashed", **ACCUM)
    crashed = launch(args, nproc=2, faults={"S4V_FAULT_KILL": "0:2", "S4V_FAULT_KEYLOG": str(tmp_path / "keys")},
                     timeout=300)
    assert crashed.returncode != 0
    run_dir = tmp_path / "crashed"
    assert read_lineage(run_dir) and not (run_dir / "checkpoints" / "latest").exists()
    assert '"train/loss"' in (run_dir / "metrics.jsonl").read_text()  # step 1 of the crashed attempt
    rest = launch(args, nproc=2, timeout=300).result()
    assert rest["step"] == 6
    _assert_same_losses(uninterrupted["run_dir"], rest["run_dir"], 6)  # each step once
    _assert_every_sample_once(rest["run_dir"], [0, 1])


def test_resume_from_another_runs_checkpoint_leaves_that_run_alone(shards, tmp_path, uninterrupted):
    """`train.resume=<other run>/checkpoints/step_3` in a new run: the other run's later checkpoints were
    moved to its `abandoned/` folder; now that folder is left as it is, the new run continues exactly,
    and its lineage holds its own steps only. A resume path with no checkpoint is an error, not a silent
    fresh start."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(uninterrupted["run_dir"], source)
    before = sorted(p.name for p in (source / "checkpoints").iterdir())
    assert "step_00000003" in before and "step_00000006" in before
    branch = run_train(tiny_overrides(shards, tmp_path, "branch", **ACCUM,
                                      **{"train.resume": source / "checkpoints" / "step_00000003"}), nproc=2)
    assert sorted(p.name for p in (source / "checkpoints").iterdir()) == before
    assert branch["step"] == 6 and branch["status"] == "finished"
    full = losses(uninterrupted["run_dir"])
    assert losses(branch["run_dir"]) == pytest.approx({s: full[s] for s in (4, 5, 6)}, abs=1e-6)
    _assert_every_sample_once(branch["run_dir"], [1])

    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    proc = launch(tiny_overrides(shards, tmp_path, "fresh", **ACCUM, **{"train.resume": tmp_path / "empty"}))
    assert proc.returncode == 2 and "holds no checkpoint yet" in proc.stderr, proc.tail()
    assert "Traceback" not in proc.stderr and not (tmp_path / "fresh").exists()  # refused before the run folder
    # the branch relaunched from the same checkpoint: its own later checkpoints are set aside, not mixed in
    again = run_train(tiny_overrides(shards, tmp_path, "branch", **ACCUM, **{
        "train.resume": source / "checkpoints" / "step_00000003", "train.max_steps": 4}), nproc=2)
    assert again["step"] == 4
    branch_ckpts = Path(branch["run_dir"]) / "checkpoints"
    assert (branch_ckpts / "latest").read_text().strip() == "step_00000004"
    assert [p.name.split("-")[0] for p in (branch_ckpts / "abandoned").iterdir()] == ["step_00000006"]


def test_nan_on_one_rank_skips_the_whole_window_on_every_rank(shards, tmp_path):
    """Real DeepSpeed, 2 ranks x accumulation 2: a NaN loss in rank 1's micro-batches of the second
    window skips that optimizer update on both ranks (DeepSpeed's own count agrees), the run goes on,
    and the weights stay finite."""
    import torch

    from tests.faults._common import ckpt_dir, final_weights

    args = tiny_overrides(shards, tmp_path, "nan", **ACCUM, **{"train.epochs": 1})
    run = launch(args, nproc=2, faults={"S4V_FAULT_NAN": "2", "S4V_FAULT_NAN_RANK": "1"}, timeout=240)
    assert run.returncode == 0, run.tail()
    res = run.result()
    assert res["step"] == res["ds_optimizer_steps"] == 2  # 3 windows in the epoch, one skipped everywhere
    assert "update skipped (1 in a row)" in run.output
    rows = read_lineage(Path(res["run_dir"]))
    assert sum(1 for r in rows if r.get("skipped")) == 4  # the window's 2 micro-batches on each of 2 ranks
    assert all(torch.isfinite(v).all() for v in final_weights(ckpt_dir(tmp_path, "nan")).values())
