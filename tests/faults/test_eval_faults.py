"""Evaluation faults: unreadable videos are counted, listed and fatal beyond `eval.max_skip_fraction`
(`s4v eval` and the in-training evaluation); a run directory evaluates from any folder; a weights file
that is not one, or is of another model, is one clear error (rc 2, no traceback)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import s4v
from s4v.config import dump_config
from s4v.experiment import load_experiment
from s4v.model.checkpoint_io import load_model, save_model
from tests._video_fixtures import Spec, write_split

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)
CLASSES = [f"c{i}" for i in range(6)]
BAD = "v1_2"  # the one unreadable video (garbage bytes) of the 8-video val split


def overrides(root: str, **extra) -> list[str]:
    base = {"model.name": "s4v_tiny", "model.num_classes": 6, "model.num_frames": 4, "model.backbone_dtype": "fp32",
            "data.root": root, "data.loader": "pyav", "data.num_frames": 4, "data.image_size": 32,
            "data.resize_short": 32, "data.batch_size": 2, "data.num_workers": 1, "data.min_shards_per_reader": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """`launch/shards`: 8 val videos, one of them garbage, and a clean split of 4; a tiny model file
    (tower included), the side network and head alone, and the tower alone in `launch/tower.pt`."""
    base = tmp_path_factory.mktemp("eval_faults")
    root = base / "launch" / "shards"
    write_split(root, "val", [[Spec(f"v{s}_{i}", 12, (s * 4 + i) % 6, height=32, width=32,
                                    corrupt="garbage" if f"v{s}_{i}" == BAD else None) for i in range(4)]
                              for s in range(2)], classes=CLASSES)
    write_split(root, "clean", [[Spec(f"c{i}", 12, i, height=32, width=32) for i in range(4)]], classes=CLASSES)
    torch.manual_seed(0)
    model = s4v.create_model("s4v_tiny", num_classes=6, num_frames=4)
    save_model(model, base / "model.pt", include_backbone=True)
    save_model(model, base / "side_head.pt", include_backbone=False)
    torch.save({k.removeprefix("backbone.tower."): v for k, v in model.state_dict().items()
                if k.startswith("backbone.tower.")}, base / "launch" / "tower.pt")
    return SimpleNamespace(base=base, root=root, model=model)


def run_dir(setup, name: str, model_file: str, command_txt: str, **extra) -> Path:
    path = setup.base / name
    path.mkdir()
    dump_config(load_experiment(None, overrides(**extra)), path / "config.yaml")
    shutil.copy(setup.base / model_file, path / "model_side_head.pt")
    (path / "command.txt").write_text(command_txt)
    return path


def s4v_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "s4v.cli.main", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=150)


def tensorboard_scalar(logdir: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc.Scalars(tag)[-1].value


@pytest.mark.slow
def test_eval_counts_unreadable_videos_and_fails_beyond_max_skip_fraction(setup):
    run = run_dir(setup, "run_abs", "model.pt", "python -m s4v.train\n", root=str(setup.root))
    failed = s4v_cli("eval", run, cwd=setup.base)  # default eval.max_skip_fraction=0.01: 1 of 8 is too many
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert "1 of 8 evaluation videos could not be read (more than eval.max_skip_fraction=0.01)" in failed.stderr
    assert f"{BAD} (decode failed" in failed.stderr
    report = json.loads((run / "eval.json").read_text())
    assert (report["num_samples"], report["num_evaluated"], report["num_unreadable"]) == (8, 7, 1)
    assert report["unreadable"][0]["key"] == BAD and "error" in report

    ok = s4v_cli("eval", run, "eval.max_skip_fraction=0.2", cwd=setup.base)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "(7 of 8 videos; 1 unreadable, not counted" in ok.stdout and f"unreadable: {BAD} (decode failed" in ok.stdout
    report = json.loads((run / "eval.json").read_text())
    assert (report["num_samples"], report["num_unreadable"]) == (8, 1) and "error" not in report
    assert tensorboard_scalar(run / "tensorboard" / "eval", "eval/num_unreadable") == 1
    assert tensorboard_scalar(run / "tensorboard" / "eval", "eval/num_samples") == 8


@pytest.mark.slow
def test_old_run_dir_with_relative_paths_evaluates_from_another_folder(setup):
    """config.yaml of an older run holds data.root and model.pretrained as given (relative to where the
    run started); they are resolved against the launch directory in command.txt."""
    launch = setup.base / "launch"
    run = run_dir(setup, "run_rel", "side_head.pt", f"python -m s4v.train x.yaml\ncwd: {launch}\n\n",
                  root="shards", **{"model.pretrained": "tower.pt"})
    elsewhere = setup.base / "elsewhere"
    elsewhere.mkdir()
    got = s4v_cli("eval", run, "data.val_split=clean", cwd=elsewhere)
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["num_samples"] == 4


def test_launch_dir_of_old_and_new_command_txt(tmp_path):
    from s4v.train.run_dir import launch_dir

    old = "python -m s4v.train a.yaml\n\nSLURM_JOB_ID=3\nSLURM_SUBMIT_DIR=/home/u/s4v\n"
    (tmp_path / "command.txt").write_text(old)
    assert launch_dir(tmp_path) == Path("/home/u/s4v")  # before the cwd line: Slurm's submit directory
    (tmp_path / "command.txt").write_text("python -m s4v.train a.yaml\ncwd: /work/x\n\nSLURM_SUBMIT_DIR=/home/u\n")
    assert launch_dir(tmp_path) == Path("/work/x")


def test_new_run_dirs_store_absolute_paths(tmp_path, monkeypatch):
    import yaml

    from s4v.train.run_dir import write_run_description

    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(None, overrides("shards", **{"model.pretrained": "weights/tower.pt"}))
    write_run_description(tmp_path / "run", cfg, {}, ["x.yaml"])
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"]["root"] == str(tmp_path / "shards")
    assert stored["model"]["pretrained"] == str(tmp_path / "weights" / "tower.pt")
    assert f"\ncwd: {tmp_path}\n" in (tmp_path / "run" / "command.txt").read_text()


# ------------------------------------------------------------------------------ in-training evaluation
class FakeLogger:
    def __init__(self):
        self.rows = {}

    def log(self, step, values):
        self.rows.update(values)

    def image(self, *args):
        pass


def fake_trainer(setup, max_skip: float):
    from s4v.train.dist import DistInfo
    from s4v.train.engine import TrainableSide

    cfg = load_experiment(None, overrides(str(setup.root), **{"eval.max_skip_fraction": max_skip}))
    saved = []
    return SimpleNamespace(cfg=cfg, info=DistInfo(0, 1, 0, torch.device("cpu")), model=setup.model,
                           engine=TrainableSide(setup.model), logger=FakeLogger(), step=5,
                           save=lambda: saved.append(5), saved=saved)


@pytest.mark.slow
def test_in_training_evaluation_counts_unreadable_and_stops_after_saving(setup):
    from s4v.eval.skips import EvalSkipError
    from s4v.train.tasks import RecognitionTask

    trainer = fake_trainer(setup, 0.2)
    report = RecognitionTask(trainer.cfg).evaluate(trainer, full_views=False)
    assert (report["num_samples"], report["num_evaluated"], report["num_unreadable"]) == (8, 7, 1)
    assert trainer.logger.rows["val_single/num_unreadable"] == 1 and trainer.logger.rows["val_single/num_samples"] == 8
    assert trainer.saved == []

    trainer = fake_trainer(setup, 0.01)
    with pytest.raises(EvalSkipError, match=rf"1 of 8 evaluation videos could not be read .*{BAD} \(decode failed"):
        RecognitionTask(trainer.cfg).evaluate(trainer, full_views=False)
    assert trainer.saved == [5]  # the checkpoint of this point is written before the run stops


def test_retrieval_evaluation_counts_unreadable():
    """evaluate_retrieval reads the loader's skipped keys too (tiny stand-in encoders)."""
    from s4v.eval.retrieval import evaluate_retrieval
    from s4v.model.wti import TextEmbedding, VideoEmbedding

    class Loader(list):
        skipped_keys = [("old", "from an earlier epoch")]

        def __iter__(self):
            self.skipped_keys.append(("b", "decode failed: bad"))
            return super().__iter__()

    batches = Loader([{"video": torch.randn(2, 4, 3, 8, 8), "key": ["a", "c"], "valid": torch.tensor([True, True])}])
    captions = SimpleNamespace(all=lambda key: [f"caption of {key}"])
    video = lambda v: VideoEmbedding(torch.nn.functional.normalize(torch.randn(v.shape[0], 4, 8), dim=-1),  # noqa: E731
                                     torch.ones(v.shape[0], 4))
    texts = lambda t: TextEmbedding(torch.nn.functional.normalize(torch.randn(len(t), 3, 8), dim=-1),  # noqa: E731
                                    torch.ones(len(t), 3, dtype=torch.bool), torch.ones(len(t), 3))
    report = evaluate_retrieval(video, texts, batches, captions, torch.device("cpu"))
    assert (report["num_samples"], report["num_evaluated"], report["num_unreadable"]) == (3, 2, 1)
    assert report["unreadable"] == [{"key": "b", "reason": "decode failed: bad"}]


# ------------------------------------------------------------------------------------- weights files
@pytest.fixture(scope="module")
def not_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("not_weights")
    (d / "garbage.pt").write_bytes(bytes(range(256)) * 20)
    (d / "notes.pt").write_text("model: ViT-B-16\nlr: 1e-3\n")
    torch.save({"cfg": {"lr": 0.1}, "epoch": 3}, d / "no_tensors.pt")
    return d


@pytest.mark.parametrize("name", ["garbage.pt", "notes.pt", "no_tensors.pt"])
def test_not_a_weights_file_is_one_clear_error(not_weights, name):
    from s4v.model.retrieval import load_retrieval_model
    from s4v.model.weights_file import WeightsFileError

    path = not_weights / name
    loaders = [lambda: s4v.create_model("s4v_tiny", num_classes=6, num_frames=4, pretrained=str(path))]
    if name != "no_tensors.pt":  # a dict without s4v's format tag is "not an s4v model file"
        loaders += [lambda: load_model(path), lambda: load_retrieval_model(path)]
    for load in loaders:
        with pytest.raises(WeightsFileError) as err:
            load()
        assert f"not a weights file: {path} (" in str(err.value)
        assert "weights_only" not in str(err.value)


@pytest.mark.slow
def test_cli_rejects_unusable_weights_files_without_traceback(setup, not_weights):
    garbage = not_weights / "garbage.pt"
    got = s4v_cli("eval", garbage, *overrides(str(setup.root)), cwd=setup.base)
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr[-3000:]
    assert got.stderr.strip() .startswith(f"s4v eval: error: not a weights file: {garbage} (")
    assert len(got.stderr.strip().splitlines()) == 1

    other = setup.base / "other_tower.pt"  # a tower of another size: the existing key/shape message
    sd = torch.load(setup.base / "launch" / "tower.pt")
    name = next(k for k, v in sd.items() if v.ndim == 2)
    sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
    torch.save(sd, other)
    got = s4v_cli("eval", setup.base / "side_head.pt", *overrides(str(setup.root), **{"model.pretrained": other}),
                  cwd=setup.base)
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr[-3000:]
    assert "do not match the model's tower: 1 shape mismatch" in got.stderr


def test_convert_official_rejects_a_file_that_is_not_a_checkpoint(not_weights, tmp_path, capsys):
    from s4v.cli.main import main

    assert main(["convert-official", str(not_weights / "garbage.pt"), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"s4v convert-official: error: not a weights file: {not_weights / 'garbage.pt'} (")
    assert "weights_only" not in err and not (tmp_path / "out.pt").exists()
