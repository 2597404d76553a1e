"""Experiment configs: every shipped recipe loads; mistakes are clear errors."""
from pathlib import Path

import pytest

from s4v.config import ConfigError
from s4v.experiment import load_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "ds_configs" / "experiments").glob("*.yaml"))


def test_recipes_exist_for_every_dataset_and_backbone():
    names = {p.stem for p in EXPERIMENTS}
    for ds in ("k400", "ssv1", "ssv2"):
        for bb in ("b32", "b16", "l14", "e14"):
            assert f"{ds}_{bb}_f8" in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_recipe_loads(path):
    cfg = load_experiment(str(path))
    assert cfg.model.num_frames == cfg.data.num_frames
    if path.stem.startswith("ss"):
        assert cfg.data.flip_label_swap == [[86, 87], [93, 94], [166, 167]] and cfg.data.repeated_aug == 2


def test_override_and_errors(tmp_path):
    cfg = load_experiment(None, ["model.name=s4v_tiny", "data.image_size=32", "optim.lr=3e-4",
                                 "model.overrides={side.width: 128}"])
    assert cfg.optim.lr == 3e-4 and cfg.model.overrides == {"side.width": 128}
    with pytest.raises(ConfigError, match="did you mean 'model.num_frames'"):
        load_experiment(None, ["model.num_frame=16"])
    with pytest.raises(ConfigError, match="expected int"):
        load_experiment(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="did you mean 's4v_b16'"):
        load_experiment(None, ["model.name=s4v_b61"])
    with pytest.raises(ConfigError, match="data.num_frames"):
        load_experiment(None, ["model.num_frames=16"])
    with pytest.raises(ConfigError, match="data.image_size=224 but s4v_tiny takes 32px"):
        load_experiment(None, ["model.name=s4v_tiny"])
    with pytest.raises(ConfigError, match="model.overrides"):
        load_experiment(None, ["model.overrides={side.widht: 1}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  warmup: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.warmup_epochs'"):
        load_experiment(str(bad))
