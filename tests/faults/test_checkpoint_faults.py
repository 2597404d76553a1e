"""One CPU rank: the process killed while writing a checkpoint, a full disk during a checkpoint, and
NaN losses. The previous checkpoint stays complete and `latest` never names a partial one; resuming
works; NaN/inf steps are skipped and counted, and K in a row stop training with a clear message."""
import json
import re
import shutil

import pytest

from s4v.train import checkpoint

from ._common import assert_same_weights, ckpt_dir, final_weights, launch, overrides

pytestmark = pytest.mark.timeout(200)
STEPS = 13  # 26 clips / batch 2


def _args(root, out, run, **kw):
    return overrides(root, out, run, **{"train.ckpt_every_steps": 2, "train.keep_checkpoints": 5, **kw})


@pytest.fixture(scope="module")
def killed_during_save(shards_with_bad_label, tmp_path_factory):
    """SIGKILL half-way through writing checkpoint step 4, then the same command again."""
    out = tmp_path_factory.mktemp("ckpt_kill")
    args = _args(shards_with_bad_label, out, "run")
    first = launch(args, faults={"S4V_FAULT_CKPT": "kill:4"})
    ckpts = ckpt_dir(out, "run")
    state = {"rc": first.returncode, "latest": (ckpts / "latest").read_text().strip(),
             "latest_tag": checkpoint.latest_tag(ckpts),
             "complete": checkpoint.complete_tags(ckpts), "partial": sorted(p.name for p in ckpts.iterdir()
                                                                          if p.is_dir() and not (p / "COMPLETE").exists())}
    second = launch(args)
    return out, first, second, state


@pytest.fixture(scope="module")
def disk_full_during_save(shards_with_bad_label, tmp_path_factory):
    """A full device while DeepSpeed writes checkpoint step 6 (torch.save's own error), then the same
    command again."""
    out = tmp_path_factory.mktemp("ckpt_enospc")
    args = _args(shards_with_bad_label, out, "run")
    first = launch(args, faults={"S4V_FAULT_CKPT": "enospc:6"})
    ckpts = ckpt_dir(out, "run")
    state = {"latest": (ckpts / "latest").read_text().strip(), "dirs": sorted(p.name for p in ckpts.iterdir() if p.is_dir())}
    second = launch(args)
    return out, first, second, state


def test_kill_while_saving_keeps_previous_checkpoint(killed_during_save):
    out, first, second, state = killed_during_save
    assert state["rc"] == -9, first.tail()  # really died, with the step-4 folder half written
    assert [p.split(".tmp-")[0] for p in state["partial"]] == ["step_00000004"]  # the temporary folder
    assert state["latest"] == "step_00000002" and state["complete"] == ["step_00000002"]
    assert state["latest_tag"] == "step_00000002"  # what a resume loads
    assert second.returncode == 0, second.tail()
    assert re.search(r"resumed from .* at epoch 0, step 2\b", second.output)
    assert second.result()["step"] == STEPS and second.result()["status"] == "finished"
    ckpts = ckpt_dir(out, "run")
    assert all((ckpts / t / "COMPLETE").is_file() for t in (p.name for p in ckpts.iterdir() if p.is_dir()))


def test_full_disk_gives_clear_error_and_keeps_previous_checkpoint(disk_full_during_save):
    out, first, second, state = disk_full_during_save
    assert first.returncode == 1
    assert "s4v train: stopped: could not write checkpoint step_00000006" in first.stderr, first.tail()
    assert "a file write failed" in first.stderr and "previous checkpoint (step_00000004) is intact" in first.stderr
    assert state["latest"] == "step_00000004"
    assert state["dirs"] == ["step_00000002", "step_00000004"]  # the partial step-6 folder was removed
    assert second.returncode == 0, second.tail()
    assert re.search(r"resumed from .* at epoch 0, step 4\b", second.output)
    assert second.result()["step"] == STEPS


def test_resumes_after_checkpoint_faults_agree(killed_during_save, disk_full_during_save):
    """Resumed from step 2 and from step 4: the same final weights (exact resume, any restart point)."""
    a = final_weights(ckpt_dir(killed_during_save[0], "run"))
    b = final_weights(ckpt_dir(disk_full_during_save[0], "run"))
    assert_same_weights(a, b)


def test_broken_checkpoints_are_skipped_on_resume(killed_during_save, shards_with_bad_label, tmp_path):
    """Optimizer file of the newest checkpoint deleted, model file of the next one truncated: the resume
    names both and continues from the third newest (raw tracebacks before)."""
    shutil.copytree(killed_during_save[0] / "run", tmp_path / "run")
    ckpts = ckpt_dir(tmp_path, "run")
    *_, third, second, newest = checkpoint.complete_tags(ckpts)
    (ckpts / newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    model = ckpts / second / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    run = launch(_args(shards_with_bad_label, tmp_path, "run"))
    assert run.returncode == 0, run.tail()
    assert f"checkpoint {ckpts / newest} is broken (zero_pp_rank_0_mp_rank_00_optim_states.pt is missing)" in run.output
    assert re.search(rf"checkpoint {re.escape(str(ckpts / second))} is broken \(mp_rank_00_model_states.pt has \d+ "
                     r"bytes, COMPLETE lists \d+", run.output)
    assert re.search(rf"resumed from .* at epoch 0, step {int(third.removeprefix('step_'))}\b", run.output)
    assert run.result()["step"] == STEPS


def test_out_of_range_label_is_skipped_and_counted_in_training(killed_during_save):
    """`bad_label` (class 9, model.num_classes 6) never reaches the loss: skipped with its reason."""
    out = killed_during_save[0]
    log = (out / "run" / "train_rank0.log").read_text()
    assert re.search(r"skipped sample bad_label \(label 9 outside \[0, 6\)", log), log[-2000:]
    config = (out / "run" / "config.yaml").read_text()
    assert "num_classes: 6" in config


def test_nan_losses_skipped_counted_then_stop(shards_with_bad_label, tmp_path):
    # attempts: 1 ok (step 1), 2 NaN (skipped, training goes on), 3-4 ok (steps 2-3, checkpoint at 2),
    # then NaN from attempt 5 on: stop after 3 in a row, at step 3
    run = launch(_args(shards_with_bad_label, tmp_path, "nan", **{"train.max_nonfinite_steps": 3}),
                 faults={"S4V_FAULT_NAN": "2,5-13"})
    assert run.returncode == 1
    assert "non-finite loss in 1 micro-batch(es) before step 2" in run.output
    assert "update skipped (1 in a row)" in run.output
    assert "s4v train: stopped: 3 consecutive non-finite losses at step 3; stopping" in run.stderr, run.tail()
    ckpts = ckpt_dir(tmp_path, "nan")
    assert "The last good checkpoint is in " + str(ckpts) in run.stderr
    assert checkpoint.latest_tag(ckpts) == "step_00000002"
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_steps"] for r in rows if "train/nonfinite_steps" in r] == [0, 1, 1]
    import torch

    weights = final_weights(ckpts)
    assert all(torch.isfinite(v).all() for v in weights.values())  # never a NaN update
