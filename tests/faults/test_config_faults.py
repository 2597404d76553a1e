"""Config and input mistakes fail before any heavy work (model build, data reads, DeepSpeed) with a
message that names the key to fix: unknown key, wrong type, missing config/data/weights/DS JSON,
a mismatched backbone checkpoint, a world size that the DS JSON's batch or the data cannot serve."""
import json
import time

import pytest
import torch

from s4v.config import ConfigError
from s4v.experiment import load_experiment
from s4v.train.preflight import preflight

from ._common import launch, overrides

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
    ({"train.grad_accum": 4, "data.batch_size": 4}, r"give 3 batches per rank per epoch, fewer than train.grad_accum=4"),
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
