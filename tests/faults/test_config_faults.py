"""Config and input mistakes fail before any heavy work (model build, data reads, DeepSpeed) with a
message that names the key to fix: unknown key, wrong type, missing config/data/weights/DS JSON,
a mismatched backbone checkpoint, a world size that the DS JSON's batch or the data cannot serve."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from s4v.config import ConfigError
from s4v.experiment import load_experiment
from s4v.train.preflight import preflight

from ._common import REPO, launch, overrides

pytestmark = pytest.mark.timeout(120)


def _cfg(root, out, **extra):
    return load_experiment(None, overrides(root, out, "run", **extra))


@pytest.mark.parametrize("override,match", [
    ("train.epoch=3", r"unknown config key 'train.epoch'; did you mean 'train.epochs'"),
    ("train.epochs=three", r"train.epochs: expected int, got 'three'"),
    ("data.batch_size=2.5", r"data.batch_size: expected int"),
    ("modle.name=s4v_tiny", r"unknown config key 'modle'.*did you mean 'model'"),
    ("model.name=s4v_tinny", r"unknown model 's4v_tinny'"),
])
def test_unknown_key_or_wrong_type(override, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(str(tmp_path / "nope.yaml"))


def test_good_config_passes_preflight(clean_shards, tmp_path):
    preflight(_cfg(clean_shards, tmp_path), world_size=2)


def test_preflight_lists_every_problem(clean_shards, tmp_path):
    bad_json = tmp_path / "fixed_batch.json"
    bad_json.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    cfg = _cfg(clean_shards, tmp_path, **{"model.pretrained": str(tmp_path / "vit.pt"),
                                          "engine.ds_config": str(bad_json), "train.resume": str(tmp_path / "ck")})
    with pytest.raises(ConfigError) as err:
        preflight(cfg, world_size=3)
    msg = str(err.value)
    assert "model.pretrained: no weights file" in msg and "vit.pt" in msg
    assert "engine.ds_config: DeepSpeed JSON sets train_batch_size=8 but the experiment gives 6" in msg
    assert "train.resume: no checkpoint folder" in msg


@pytest.mark.parametrize("extra,match", [
    ({"data.root": "/nonexistent/shards"}, r"data.root: no folder '/nonexistent/shards'"),
    ({"data.train_split": "trian"}, r"no split index .*trian-index.json"),
    ({"engine.ds_config": "ds_configs/nope.json"}, r"engine.ds_config: DeepSpeed config 'ds_configs/nope.json' not found"),
    ({"engine.ds_config": "ds_configs/zero2_fp16.json"}, r"fp16 training needs a GPU"),
    ({"train.grad_accum": 4, "data.batch_size": 4}, r"give 3 batches per rank per epoch, fewer than the 4 micro-batches of an optimizer step"),
])
def test_preflight_names_the_key(clean_shards, tmp_path, extra, match):
    if torch.cuda.is_available() and "fp16" in match:
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(ConfigError, match=match):
        preflight(_cfg(clean_shards, tmp_path, **extra), world_size=2)


def test_missing_shard_file_fails_preflight(clean_shards, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for p in clean_shards.iterdir():
        if p.name != "train-000002.tar":
            (root / p.name).symlink_to(p)
    with pytest.raises(ConfigError, match=r"1 of 4 'train' shards are missing under .*: train-000002.tar"):
        preflight(_cfg(root, tmp_path), world_size=1)


def test_too_many_ranks_for_the_data(clean_shards, tmp_path):
    """data.batch_size is per rank, so any world size divides the batch; what a world size can break
    is the data (fewer samples than ranks x batch) or a DS JSON that fixes the global batch."""
    preflight(_cfg(clean_shards, tmp_path), world_size=12)  # 24 clips: one batch of 2 per rank
    with pytest.raises(ConfigError, match=r"over 13 ranks give 0 batches per rank"):
        preflight(_cfg(clean_shards, tmp_path), world_size=13)


def test_mismatched_backbone_checkpoint(tmp_path):
    """The tower's weights are checked key by key and shape by shape when the model is built (before
    DeepSpeed and data), and the error says what does not match."""
    import s4v

    model = s4v.create_model("s4v_tiny", num_classes=6, num_frames=4)
    sd = {k.removeprefix("backbone.tower."): v for k, v in model.state_dict().items() if k.startswith("backbone.tower.")}
    name = next(k for k, v in sd.items() if v.ndim == 2)
    sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
    path = tmp_path / "other_vit.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"do not match the model's tower: 1 shape mismatch \(e.g. {name}"):
        s4v.create_model("s4v_tiny", num_classes=6, num_frames=4, pretrained=str(path))


def test_cli_fails_fast_before_any_heavy_work(clean_shards, tmp_path):
    """The real entry point: a missing weights file stops the run in seconds, before the run folder,
    the model or DeepSpeed exist."""
    t0 = time.time()
    run = launch(overrides(clean_shards, tmp_path, "run", **{"model.pretrained": "/nope/ViT-B-16.pt"}), timeout=90)
    assert run.returncode != 0
    assert "model.pretrained: no weights file '/nope/ViT-B-16.pt'" in run.stderr, run.tail()
    assert "deepspeed" not in run.output.lower()
    assert not (tmp_path / "run").exists()
    assert time.time() - t0 < 60


# ------------------------------------------------------------------- zero / nonsense values, YAML files
@pytest.mark.parametrize("override,key", [
    ("train.epochs=0", "train.epochs"), ("train.max_steps=0", "train.max_steps"),
    ("model.num_frames=0", "model.num_frames"), ("model.num_classes=0", "model.num_classes"),
    ("data.batch_size=0", "data.batch_size"), ("optim.lr=-0.001", "optim.lr"), ("optim.lr=0", "optim.lr"),
    ("optim.label_smoothing=1.5", "optim.label_smoothing"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.log_every_steps=0", "train.log_every_steps"), ("eval.max_skip_fraction=2", "eval.max_skip_fraction"),
    ("data.resize_short=0", "data.resize_short"), ("data.resize_short=-5", "data.resize_short"),
    ("data.resize_fixed=[0,0]", "data.resize_fixed"), ("data.resize_fixed=[256,-1]", "data.resize_fixed"),
])
def test_zero_and_nonsense_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be "):
        load_experiment(None, [override])


def test_yaml_with_a_duplicate_key_or_binary_content_names_file_and_key(tmp_path):
    dup = tmp_path / "dup.yaml"  # the second `model:` block would silently replace the first
    dup.write_text("model:\n  name: s4v_tiny\ntrain:\n  epochs: 2\nmodel:\n  num_frames: 4\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(dup))}: duplicate key 'model' on line 5 \(first on line 1\)"):
        load_experiment(str(dup))
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(binary))} is not a YAML text file"):
        load_experiment(str(binary))


def _s4v(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "s4v.cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def test_cli_config_errors_are_one_line_without_traceback(clean_shards, tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("model:\n  name: s4v_tiny\nmodel:\n  num_frames: 4\n")
    for args, expected in (([dup], f"{dup}: duplicate key 'model'"), (["train.epochs=0"], "train.epochs must be >= 1"),
                           (overrides(tmp_path / "nope", tmp_path, "run"), "data.root: no folder")):
        got = _s4v("train", *args)
        assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr[-2000:]
        assert expected in got.stderr and got.stderr.count("s4v train:") == 1, got.stderr  # no doubled prefix


def test_unusable_weights_file_stops_training_with_one_message(clean_shards, tmp_path):
    """model.pretrained that is not a weights file: 'not a weights file: PATH (...)', rc 2, no traceback
    and no advice to load it with weights_only=False."""
    bad = tmp_path / "ViT-B-16.pt"
    bad.write_text("<html>404 Not Found</html>\n")
    run = launch(overrides(clean_shards, tmp_path, "run", **{"model.pretrained": str(bad)}), timeout=120)
    assert run.returncode == 2, run.tail()
    assert f"s4v train: not a weights file: {bad} (" in run.stderr, run.tail()
    assert "Traceback" not in run.stderr and "weights_only" not in run.stderr


def test_build_probes_are_quiet():
    """DeepSpeed's op builders log test compiles (compilers.C.base: gcc ...) and torch its CUDA_HOME guess
    at every start; s4v train keeps them out of the log."""
    import logging

    from s4v.train.main import quiet_build_probes

    quiet_build_probes()
    assert not logging.getLogger("compilers.C.base").isEnabledFor(logging.INFO)
    assert not logging.getLogger("torch.utils.cpp_extension").isEnabledFor(logging.WARNING)


def test_yaml_merge_keys_work_and_a_non_utf8_file_says_so(tmp_path):
    """`<<: *anchor` (a YAML merge key) was refused as an unknown tag; a Latin-1 comment was reported as
    binary content."""
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &base\n  epochs: 3\n  seed: 7\ntrain:\n  <<: *base\n  epochs: 5\n")
    from s4v.config import _read_yaml

    assert _read_yaml(merged)["train"] == {"epochs": 5, "seed": 7}  # explicit keys override merged ones
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# r\xe9sum\xe9\ntrain:\n  epochs: 2\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml is not UTF-8 text \(byte 3, line 1\)"):
        load_experiment(str(latin))
