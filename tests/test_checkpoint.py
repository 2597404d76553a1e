"""Checkpoint files with a fake DeepSpeed engine (one rank, no process group): a re-save at the same step
never touches the complete folder (not even when killed), COMPLETE lists every file with its size
after an fsync, broken checkpoints are skipped on load, a full disk gives a clear error and leaves no
partial folder; `train.resume` paths; the metrics rewind; each resume's config kept."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import multiprocessing
import os
import re
from pathlib import Path

import pytest
import torch

from s4v.train import checkpoint


class FakeEngine:
    """What `checkpoint` uses of a DeepSpeed engine. `fail`: None, "enospc" (a write fails half-way
    with ENOSPC), "full-device" (torch.save writes the optimizer file onto a device that is full:
    torch's own error, a RuntimeError) or "kill" (the process dies half-way through a file)."""

    global_rank, world_size = 0, 1
    global_steps = global_samples = skipped_steps = 0
    lr_scheduler = None

    def __init__(self, value: float = 1.0, fail: str | None = None):
        self.module = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(self.module.weight, value)
        self.optimizer = torch.optim.AdamW(self.module.parameters())
        self.fail = fail

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)  # as DeepSpeed does
        torch.save({"module": self.module.state_dict(), **client_state}, folder / "mp_rank_00_model_states.pt")
        if self.fail == "full-device":
            optim_file = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            optim_file.symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
            torch.save({"state": torch.zeros(100_000)}, optim_file)
        data = os.urandom(4096)
        with open(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
            f.write(data[: len(data) // 2 if self.fail else len(data)])
            f.flush()
            if self.fail == "kill":
                os._exit(9)
            if self.fail == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f.name))

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        self.module.load_state_dict(state.pop("module"))
        return str(Path(load_dir) / tag), state


def _save(ckpts: Path, step: int, engine=None, **client) -> str:
    return checkpoint.save(engine or FakeEngine(), ckpts, step, {"step": step, **client}, {"rank": 0}, keep=5)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _save_killed(ckpts: Path, step: int) -> None:
    _save(ckpts, step, FakeEngine(value=2.0, fail="kill"), epoch=1)


def test_resave_at_the_same_step_killed_midway_keeps_the_complete_checkpoint(tmp_path):
    """Checkpoint at step 4, then (epoch end, preemption) step 4 again, killed half-way through."""
    ckpts = tmp_path / "checkpoints"
    _save(ckpts, 4, epoch=0)
    before = _files(ckpts / "step_00000004")
    child = multiprocessing.get_context("fork").Process(target=_save_killed, args=(ckpts, 4))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert _files(ckpts / "step_00000004") == before  # never written into
    assert checkpoint.verify(ckpts / "step_00000004") is None
    client, ranks = checkpoint.load(FakeEngine(value=0.0), ckpts)
    assert client["epoch"] == 0 and ranks == [{"rank": 0}]
    _save(ckpts, 6)  # the next save removes the unfinished folder
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]


def test_resave_at_the_same_step_replaces_the_folder(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _save(ckpts, 4, epoch=0)
    _save(ckpts, 4, epoch=1)
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004"]
    assert checkpoint.load(FakeEngine(), ckpts)[0]["epoch"] == 1


@pytest.mark.parametrize("fail", ["enospc", "full-device"])
def test_full_disk_keeps_previous_checkpoint_and_says_so(tmp_path, fail):
    ckpts = tmp_path / "checkpoints"
    _save(ckpts, 4, epoch=0)
    before = _files(ckpts / "step_00000004")
    for step in (4, 6):  # a re-save of the same step, and a new step
        with pytest.raises(checkpoint.CheckpointError) as err:
            _save(ckpts, step, FakeEngine(fail=fail), epoch=1)
        msg = str(err.value)
        assert f"could not write checkpoint step_0000000{step}" in msg
        assert ("No space left on device" if fail == "enospc" else "a file write failed (torch.save:") in msg
        assert re.search(r"\d+\.\d+ [MG]iB free; a checkpoint takes about \d+\.\d+ [MG]iB\)", msg)
        assert "The previous checkpoint (step_00000004) is intact" in msg
        assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004"]  # no partial folder
        assert _files(ckpts / "step_00000004") == before
        assert (ckpts / "latest").read_text().strip() == "step_00000004"


def test_complete_lists_every_file_with_its_size_after_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpts = tmp_path / "checkpoints"
    _save(ckpts, 2)
    folder = ckpts / "step_00000002"
    manifest = json.loads((folder / "COMPLETE").read_text())
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "COMPLETE"}
    assert manifest["files"] == on_disk and manifest["world_size"] == 1
    assert set(on_disk) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                            checkpoint.CONSOLIDATED}
    marker = next(i for i, p in enumerate(synced) if ".COMPLETE" in Path(p).name)
    assert {Path(p).name for p in synced[:marker]} >= set(on_disk)  # every file flushed before COMPLETE


def test_broken_checkpoints_are_skipped_on_auto_resume(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(ckpts, step)
    (ckpts / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()  # optimizer file deleted
    model = ckpts / "step_00000004" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])  # model file truncated
    with caplog.at_level(logging.WARNING):
        client, _ = checkpoint.load(FakeEngine(), ckpts)
    assert client["step"] == 2
    assert re.search(r"step_00000006 is broken \(zero_pp_rank_0_mp_rank_00_optim_states.pt is missing\)", caplog.text)
    assert re.search(r"step_00000004 is broken \(mp_rank_00_model_states.pt has 100 bytes, COMPLETE lists \d+",
                     caplog.text)
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000006 is broken: .*optim_states.pt is missing"):
        checkpoint.load(FakeEngine(), ckpts, "step_00000006")  # an explicit tag is not replaced
    (ckpts / "step_00000002" / checkpoint.CONSOLIDATED).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        checkpoint.load(FakeEngine(), ckpts)


def test_resolve_resume_accepts_tag_checkpoints_and_run_folders(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _save(ckpts, 2)
    assert checkpoint.resolve_resume(ckpts / "step_00000002") == (ckpts, "step_00000002")
    assert checkpoint.resolve_resume(ckpts) == (ckpts, None)
    assert checkpoint.resolve_resume(tmp_path / "run") == (ckpts, None)
    with pytest.raises(checkpoint.CheckpointError, match="neither a checkpoint folder"):
        checkpoint.resolve_resume(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint folder"):
        checkpoint.resolve_resume(ckpts / "step_00000009")


def test_metrics_rewind_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from s4v.train.metrics import MetricLogger

    logger = MetricLogger(tmp_path)
    for step in range(1, 7):  # the interrupted run got to step 6; its last checkpoint is step 3
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    logger = MetricLogger(tmp_path)
    logger.rewind(3)
    for step in (4, 5):
        logger.log(step, {"train/loss": 10.0 * step})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]


def test_resume_keeps_each_config_and_logs_the_differences(tmp_path, caplog):
    from s4v.experiment import ExperimentConfig
    from s4v.train.run_dir import write_run_description

    cfg = ExperimentConfig()
    write_run_description(tmp_path, cfg, {}, [])
    first = (tmp_path / "config.yaml").read_text()
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * 2))
    with caplog.at_level(logging.WARNING):
        write_run_description(tmp_path, changed, {}, [])
        write_run_description(tmp_path, changed, {}, [])
    assert (tmp_path / "config.yaml").read_text() == first
    assert (tmp_path / "config.resume-1.yaml").is_file() and (tmp_path / "config.resume-2.yaml").is_file()
    diffs = [r.getMessage() for r in caplog.records if "config changed on resume" in r.getMessage()]
    assert diffs == [f"config changed on resume (config.yaml -> config.resume-1.yaml): optim.lr: {cfg.optim.lr!r} "
                     f"-> {cfg.optim.lr * 2!r}"]


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside_and_pruning_keeps_the_new_one(tmp_path):
    """Resuming from step 2 while steps 4 and 6 exist (an abandoned continuation): 4 and 6 move to
    `abandoned/`, so the next save (step 3, keep=1) is kept and `resume=auto` loads it, not step 6."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(ckpts, step)
    assert checkpoint.set_aside_newer(ckpts, 2) == ["step_00000004", "step_00000006"]
    assert sorted(p.name.split("-")[0] for p in (ckpts / "abandoned").iterdir()) == ["step_00000004", "step_00000006"]
    tag = checkpoint.save(FakeEngine(), ckpts, 3, {"step": 3}, {}, keep=1)
    assert checkpoint.complete_tags(ckpts) == [tag] == [checkpoint.latest_tag(ckpts)]


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (5, 7):
        _save(ckpts, step)
    tag = checkpoint.save(FakeEngine(), ckpts, 6, {"step": 6}, {}, keep=2)  # a lower step than an older save
    assert tag in checkpoint.complete_tags(ckpts) and checkpoint.latest_tag(ckpts) == tag
