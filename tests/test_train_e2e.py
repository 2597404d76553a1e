"""End-to-end training on the CPU with DeepSpeed: a run finishes and describes itself; an interrupted
and resumed run gives exactly the losses of an uninterrupted one; two ranks train together."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_fixtures import (NUM_CLASSES, losses, run_train, tiny_overrides,
                                   write_tiny_shards)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


overrides = tiny_overrides


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(shards, tmp_path):
    full = run_train(overrides(shards, tmp_path, "full"))
    assert full["status"] == "finished" and full["step"] == 24  # 2 epochs x 12 batches per rank
    part = run_train(overrides(shards, tmp_path, "resumed", **{"train.max_steps": 7}))
    assert part["step"] == 7
    rest = run_train(overrides(shards, tmp_path, "resumed"))
    assert rest["step"] == 24
    a, b = losses(full["run_dir"]), losses(rest["run_dir"])
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    run_dir = Path(full["run_dir"])
    for name in ("config.yaml", "ds_config.json", "git.txt", "versions.json", "command.txt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000024"


# Two ranks, fp32 ZeRO-2, one epoch, evaluated and exported: checked on its own and the reference of the
# other ZeRO stages (trained once per module).
ZERO2_TWO_RANKS = {"train.epochs": 1, "eval.at_end": True, "train.export": True}


@pytest.fixture(scope="module")
def zero2_two_ranks(shards, tmp_path_factory):
    return run_train(overrides(shards, tmp_path_factory.mktemp("zero2"), "ddp", **ZERO2_TWO_RANKS), nproc=2)


@pytest.mark.slow
def test_two_ranks_train_evaluate_and_export(zero2_two_ranks):
    res = zero2_two_ranks
    assert res["status"] == "finished" and res["step"] == 6  # 24 clips / 2 ranks / batch 2
    assert 0.0 <= res["val_top1"] <= 1.0
    run_dir = Path(res["run_dir"])
    export = run_dir / "model_side_head.pt"
    assert export.is_file()
    import torch

    from s4v.model.checkpoint_io import load_model

    sd = torch.load(export, weights_only=True)
    assert sd["includes_backbone"] is True  # random tower (no weights file): exported with the model
    assert sd["preprocess"]["num_frames"] == 4 and sd["preprocess"]["image_size"] == 32  # for s4v predict
    model = load_model(export)
    assert model.num_classes == NUM_CLASSES and not model.training
    out = subprocess.run([sys.executable, "-m", "s4v.cli.main", "eval", str(run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["top1"] == pytest.approx(res["val_top1"], abs=1e-6) and report["num_samples"] == 8
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/top1" in r for r in rows) and any("perf/clips_per_s" in r for r in rows)


@pytest.mark.slow
def test_sharded_frozen_tower_trains_exactly_like_a_replicated_one(shards, tmp_path):
    """model.shard_backbone on two ranks of one node: each rank keeps half of the frozen tower, and the
    run's losses equal those of the same run with the tower replicated."""
    import torch

    import s4v

    torch.manual_seed(3)
    tower = tmp_path / "tiny_tower.pt"
    torch.save(s4v.create_model("s4v_tiny", NUM_CLASSES, 4).backbone.tower.state_dict(), tower)
    common = {"model.pretrained": str(tower), "train.epochs": 1}
    full = run_train(overrides(shards, tmp_path, "replicated", **common), nproc=2)
    sharded = run_train(overrides(shards, tmp_path, "sharded", **common, **{"model.shard_backbone": True}), nproc=2)
    assert full["step"] == sharded["step"] == 6
    a, b = losses(full["run_dir"]), losses(sharded["run_dir"])
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    log = (Path(sharded["run_dir"]) / "train_rank0.log").read_text()
    assert "frozen tower over 2 ranks of this node" in log, log[-2000:]
    assert "frozen tower over" not in (Path(full["run_dir"]) / "train_rank0.log").read_text()


def test_shard_backbone_without_a_weights_file_is_refused(shards, tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "s4v.train",
                           *overrides(shards, tmp_path, "refused", **{"model.shard_backbone": True})],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "model.shard_backbone needs model.pretrained" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train_like_zero2(shards, tmp_path, zero2_two_ranks, stage):
    """Two ranks, fp32: ZeRO-1 and ZeRO-3 (parameters partitioned and gathered per module) give ZeRO-2's
    per-step losses, and the export of a ZeRO-3 run evaluates like the run's own last evaluation."""
    ref = zero2_two_ranks
    got = run_train(overrides(shards, tmp_path, f"zero{stage}", **ZERO2_TWO_RANKS,
                              **{"engine.ds_config": f"ds_configs/zero{stage}_fp32.json"}), nproc=2)
    a, b = losses(ref["run_dir"]), losses(got["run_dir"])
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert json.loads((Path(got["run_dir"]) / "ds_config.json").read_text())["zero_optimization"]["stage"] == stage
    out = subprocess.run([sys.executable, "-m", "s4v.cli.main", "eval", got["run_dir"]], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((Path(got["run_dir"]) / "eval.json").read_text())["top1"] == pytest.approx(got["val_top1"])


@pytest.mark.slow
def test_bertadam_resume_gives_the_same_losses(shards, tmp_path):
    """The client optimizer's state (BertAdam moments) is checkpointed and restored like DeepSpeed's own."""
    opt = {"optim.optimizer": "bertadam", "optim.schedule": "cosine_global", "train.epochs": 1}
    full = run_train(overrides(shards, tmp_path, "full", **opt))
    run_train(overrides(shards, tmp_path, "resumed", **opt, **{"train.max_steps": 5}))
    rest = run_train(overrides(shards, tmp_path, "resumed", **opt))
    a, b = losses(full["run_dir"]), losses(rest["run_dir"])
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
