"""Start-up checks of the splits a run reads (issue 13, items 1, 2, 5): `s4v train` (preflight) and
`s4v eval` refuse class lists that differ (between splits, or from the model's), a model.num_classes
that is not the index's class count, and a codec the loader cannot decode here, each with one message
(rc 2) that names the differing classes or the fix, before any model or data is touched."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import s4v
from s4v.config import ConfigError
from s4v.data.classes import class_list_difference, model_class_problem
from s4v.data.format import SplitIndex
from s4v.experiment import load_experiment
from s4v.model.checkpoint_io import load_model, model_file_classes, save_model
from s4v.train.preflight import preflight, with_label_range

from tests._train_fixtures import CLASSES, tiny_overrides

from ._common import REPO, launch, overrides

pytestmark = pytest.mark.timeout(120)

EVALUATING = {"eval.every_epochs": 1}  # the fault tests' default setting reads no val split


def variant(clean: Path, root: Path, **changes: dict) -> Path:
    """A copy of the tiny data (tars linked) whose split indices get `changes` (split -> SplitIndex fields)."""
    root.mkdir()
    for p in clean.iterdir():
        if not p.name.endswith("-index.json"):
            (root / p.name).symlink_to(p)
    for split in ("train", "val"):
        replace(SplitIndex.load(clean, split), **changes.get(split, {})).save(root)
    return root


def preflight_error(root: Path, out: Path, **extra) -> str:
    with pytest.raises(ConfigError) as err:
        preflight(load_experiment(None, overrides(root, out, "run", **{**EVALUATING, **extra})), world_size=1)
    return str(err.value)


# ------------------------------------------------------------------------------------------ class lists
def test_class_list_difference_names_the_classes():
    assert class_list_difference(["a", "b"], ["a", "b"]) is None
    assert (class_list_difference(["a", "b", "c"], ["b", "c"])
            == "missing 'a'; label 0 is 'b' instead of 'a' (2 labels differ)")
    assert class_list_difference(["a", "b"], ["a", "b", "z"]) == "extra 'z'; 3 classes instead of 2"
    assert class_list_difference(["a", "b", "c"], ["a", "c", "b"]) == "label 1 is 'c' instead of 'b' (2 labels differ)"


def test_train_refuses_val_classes_that_differ(clean_shards, tmp_path):
    """The folder-dataset case: train ['c0'..'c5'], val without 'c0', so every val label is shifted."""
    root = variant(clean_shards, tmp_path / "data", val={"classes": CLASSES[1:]})
    msg = preflight_error(root, tmp_path)
    assert "the class list of split 'val' differs from that of split 'train' (6 classes)" in msg
    assert "missing 'c0'; label 0 is 'c1' instead of 'c0'" in msg and "--classes" in msg


def test_train_refuses_the_same_classes_in_another_order(clean_shards, tmp_path):
    swapped = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    msg = preflight_error(variant(clean_shards, tmp_path / "data", val={"classes": swapped}), tmp_path)
    assert "label 0 is 'c1' instead of 'c0' (2 labels differ)" in msg


def test_val_classes_not_checked_when_val_is_not_read(clean_shards, tmp_path):
    root = variant(clean_shards, tmp_path / "data", val={"classes": CLASSES[1:]})
    preflight(load_experiment(None, overrides(root, tmp_path, "run")), world_size=1)  # no evaluation


def test_cli_train_refuses_differing_classes_with_one_message(clean_shards, tmp_path):
    root = variant(clean_shards, tmp_path / "data", val={"classes": CLASSES[1:]})
    run = launch(overrides(root, tmp_path, "run", **EVALUATING), timeout=90)
    assert run.returncode == 2, run.tail()
    assert "missing 'c0'" in run.stderr and "Traceback" not in run.output, run.tail()
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- num_classes
@pytest.mark.parametrize("num_classes,effect", [(4, "labels >= 4 would be skipped"),
                                                (8, "2 outputs would never be trained")])
def test_num_classes_other_than_the_index_is_refused(clean_shards, tmp_path, num_classes, effect):
    msg = preflight_error(clean_shards, tmp_path, **{"model.num_classes": num_classes})
    assert f"model.num_classes={num_classes} but split 'train' has 6 classes: {effect}" in msg
    assert "model.num_classes=auto" in msg


def test_num_classes_auto_takes_the_train_index_count(clean_shards, tmp_path):
    cfg = load_experiment(None, [x for x in overrides(clean_shards, tmp_path, "run", **EVALUATING)
                                 if not x.startswith("model.num_classes=")])
    assert cfg.model.num_classes == "auto"  # the default
    preflight(cfg, world_size=1)
    cfg = with_label_range(cfg)
    assert cfg.model.num_classes == 6 and cfg.data.num_classes == 6


def test_num_classes_auto_needs_a_class_list(clean_shards, tmp_path):
    root = variant(clean_shards, tmp_path / "data", train={"classes": []}, val={"classes": []})
    msg = preflight_error(root, tmp_path, **{"model.num_classes": "auto"})
    assert "model.num_classes: auto takes the class count from the 'train' index, which lists no classes" in msg


# --------------------------------------------------------------------------------------------- codecs
def test_dali_cpu_on_h264_is_refused_naming_the_fixes(clean_shards, tmp_path):
    """The tiny splits are H.264: DALI's CPU decoder would fail on the first batch."""
    msg = preflight_error(clean_shards, tmp_path, **{"data.loader": "dali", "data.device": "cpu"})
    for split in ("train", "val"):
        assert f"data.loader=dali data.device=cpu cannot decode split '{split}'" in msg
    assert "it is h264" in msg and "--codec vp9" in msg and "data.loader=pyav" in msg and "data.device=gpu" in msg


def test_h264_val_next_to_vp9_train_is_refused_before_the_first_epoch(clean_shards, tmp_path):
    root = variant(clean_shards, tmp_path / "data", train={"codec": "vp9"})
    msg = preflight_error(root, tmp_path, **{"data.loader": "dali", "data.device": "cpu"})
    assert "cannot decode split 'val'" in msg and "cannot decode split 'train'" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_dali_gpu_without_cuda_is_refused(clean_shards, tmp_path):
    msg = preflight_error(clean_shards, tmp_path, **{"data.loader": "dali", "data.device": "gpu"})
    assert "data.device=gpu: DALI's GPU decoder needs CUDA" in msg and "data.loader=pyav" in msg


def test_pyav_reads_h264(clean_shards, tmp_path):
    preflight(load_experiment(None, overrides(clean_shards, tmp_path, "run", **EVALUATING)), world_size=1)


# ---------------------------------------------------------------------------------------------- s4v eval
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny recognition model (random tower, 6 classes) saved with its class names, and without."""
    out = tmp_path_factory.mktemp("models")
    model = s4v.create_model("s4v_tiny", num_classes=6, num_frames=4)
    save_model(model, out / "with_classes.pt", include_backbone=True, classes=CLASSES)
    save_model(model, out / "old_format.pt", include_backbone=True)
    return out


def run_eval(model_file: Path, root: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    args = tiny_overrides(root, out, "run", **extra)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "s4v.eval.main", str(model_file), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90)


def test_export_keeps_the_class_names(model_files):
    assert load_model(model_files / "with_classes.pt").class_names == CLASSES
    assert load_model(model_files / "old_format.pt").class_names is None
    assert model_file_classes(model_files / "with_classes.pt") == (CLASSES, 6)  # without building the model
    assert model_file_classes(model_files / "old_format.pt") == (None, 6)
    assert model_class_problem(CLASSES, 6, CLASSES, "val", "m.pt") is None
    assert model_class_problem(None, 6, CLASSES, "val", "m.pt") is None


def test_eval_refuses_a_split_whose_classes_differ_from_the_model(model_files, clean_shards, tmp_path):
    root = variant(clean_shards, tmp_path / "data", val={"classes": [*CLASSES[:5], "z"]})
    proc = run_eval(model_files / "with_classes.pt", root, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the class list of split 'val' differs from that of the model" in proc.stderr
    assert "missing 'c5'; extra 'z'; label 5 is 'z' instead of 'c5'" in proc.stderr
    assert "Traceback" not in proc.stderr and "RESULT_JSON" not in proc.stdout


def test_eval_of_a_file_without_class_names_checks_the_count(model_files, clean_shards, tmp_path):
    root = variant(clean_shards, tmp_path / "data", val={"classes": CLASSES[:5]})
    proc = run_eval(model_files / "old_format.pt", root, tmp_path)
    assert proc.returncode == 2 and "has 6 classes but split 'val' lists 5" in proc.stderr, proc.stderr[-2000:]


def test_eval_refuses_a_codec_the_loader_cannot_read(model_files, clean_shards, tmp_path):
    proc = run_eval(model_files / "with_classes.pt", clean_shards, tmp_path, **{"data.loader": "dali",
                                                                                 "data.device": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot decode split 'val'" in proc.stderr and "--codec vp9" in proc.stderr
    assert "Traceback" not in proc.stderr
