"""Tests for s4v.config (typed dataclass config loader)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from s4v.config import ConfigError, config_from_dict, config_to_dict, dump_config, load_config

# ----------------------------------------------------------------------------- example configs


@dataclass
class ModelCfg:
    name: str = "s4v_b16"
    num_frames: int = 8
    pretrained: Optional[str] = "clip"
    drop_path: float = 0.1
    arch: Literal["vit_b16", "vit_l14"] = "vit_b16"
    side_dims: list[int] = field(default_factory=lambda: [320, 320])


@dataclass
class DataCfg:
    mean: tuple[float, ...] = (0.48, 0.46, 0.41)
    crop: tuple[int, int] = (224, 224)
    root: str | None = None
    shuffle: bool = True
    extra: dict[str, int] = field(default_factory=dict)


@dataclass
class OptimCfg:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainCfg:
    epochs: int = 30
    warmup_epochs: int = 5
    amp: bool = True
    optim: OptimCfg = field(default_factory=OptimCfg)

    def validate(self) -> None:
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"train.warmup_epochs ({self.warmup_epochs}) > train.epochs ({self.epochs})")


@dataclass
class AuxCfg:
    weight: float = 1.0


@dataclass(frozen=True)
class LossCfg:
    label_smoothing: float = 0.0
    level: Literal[0, 1, 2] = 0


@dataclass
class Cfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    aux: Optional[AuxCfg] = None
    loss: LossCfg = LossCfg()  # shared (frozen) class-level default instance
    seed: int = 0
    out_dir: Path = Path("runs")


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- defaults / merging


def test_defaults():
    cfg = load_config(Cfg)
    assert cfg == Cfg()
    assert cfg.model.num_frames == 8 and cfg.train.optim.lr == 1e-4 and cfg.aux is None


def test_yaml_merge_keeps_unspecified_defaults(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"model": {"num_frames": 16}, "train": {"optim": {"lr": 0.01}}, "seed": 3})
    cfg = load_config(Cfg, p)
    assert cfg.model.num_frames == 16
    assert cfg.model.name == "s4v_b16"  # untouched sibling
    assert cfg.train.optim.lr == 0.01
    assert cfg.train.optim.betas == (0.9, 0.999)
    assert cfg.train.epochs == 30
    assert cfg.seed == 3


def test_empty_yaml_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(Cfg, str(p)) == Cfg()


def test_overrides_after_yaml_win(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"model": {"num_frames": 16, "name": "from_yaml"}})
    cfg = load_config(Cfg, p, ["model.num_frames=32"])
    assert cfg.model.num_frames == 32
    assert cfg.model.name == "from_yaml"


def test_overrides_applied_in_order():
    cfg = load_config(Cfg, overrides=["seed=1", "seed=2"])
    assert cfg.seed == 2


def test_nested_overrides():
    cfg = load_config(Cfg, overrides=["train.optim.lr=0.5", "train.optim.betas=[0.8, 0.95]", "train.epochs=12"])
    assert cfg.train.optim.lr == 0.5
    assert cfg.train.optim.betas == (0.8, 0.95)
    assert cfg.train.epochs == 12
    assert cfg.train.warmup_epochs == 5 and cfg.train.amp is True  # untouched siblings


def test_override_value_parsing():
    cfg = load_config(
        Cfg,
        overrides=[
            "model.name=s4v_l14",
            "model.pretrained=null",
            "data.mean=[0.5,0.5,0.5]",
            "data.shuffle=false",
            "data.extra={a: 1, b: 2}",
            "data.root=/data/k400",
        ],
    )
    assert cfg.model.name == "s4v_l14"
    assert cfg.model.pretrained is None
    assert cfg.data.mean == (0.5, 0.5, 0.5) and isinstance(cfg.data.mean, tuple)
    assert cfg.data.shuffle is False
    assert cfg.data.extra == {"a": 1, "b": 2}
    assert cfg.data.root == "/data/k400"


def test_optional_section_created_from_override():
    cfg = load_config(Cfg, overrides=["aux.weight=0.5"])
    assert cfg.aux == AuxCfg(weight=0.5)
    assert load_config(Cfg, overrides=["aux.weight=0.5", "aux=null"]).aux is None


# ----------------------------------------------------------------------------- coercion


def test_float_coercion_from_string_and_int(tmp_path):
    cfg = load_config(Cfg, overrides=["train.optim.lr=1e-3"])  # YAML 1.1 parses 1e-3 as str
    assert cfg.train.optim.lr == pytest.approx(1e-3) and type(cfg.train.optim.lr) is float
    p = write_yaml(tmp_path / "c.yaml", {"model": {"drop_path": 1}, "data": {"mean": [1, 0, 0]}})
    cfg = load_config(Cfg, p)
    assert type(cfg.model.drop_path) is float and cfg.model.drop_path == 1.0
    assert all(type(x) is float for x in cfg.data.mean)


def test_path_field_from_string_and_dumped_as_string(tmp_path):
    cfg = load_config(Cfg, overrides=["out_dir=/tmp/exp1"])
    assert cfg.out_dir == Path("/tmp/exp1") and isinstance(cfg.out_dir, Path)
    assert config_to_dict(cfg)["out_dir"] == "/tmp/exp1"
    with pytest.raises(ConfigError, match=r"^out_dir: expected Path, got 3 \(int\)$"):
        load_config(Cfg, overrides=["out_dir=3"])


def test_int_accepts_integral_float():
    cfg = load_config(Cfg, overrides=["model.num_frames=16.0"])
    assert cfg.model.num_frames == 16 and type(cfg.model.num_frames) is int


def test_bool_accepts_true_false_strings(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"data": {"shuffle": "False"}, "train": {"amp": "true"}})
    cfg = load_config(Cfg, p)
    assert cfg.data.shuffle is False and cfg.train.amp is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_frames=eight", "model.num_frames: expected int, got 'eight' (str)"),
        ("model.num_frames=true", "model.num_frames: expected int, got True (bool)"),
        ("model.num_frames=1.5", "model.num_frames: expected int, got 1.5 (float)"),
        ("model.num_frames=null", "model.num_frames: expected int, got None (NoneType)"),
        ("train.amp=1", "train.amp: expected bool, got 1 (int)"),
        ("train.amp=maybe", "train.amp: expected bool, got 'maybe' (str)"),
        ("train.optim.lr=abc", "train.optim.lr: expected float, got 'abc' (str)"),
        ("train.optim.lr=true", "train.optim.lr: expected float, got True (bool)"),
        ("model.name=[1, 2]", "model.name: expected str, got [1, 2] (list)"),
        ("model.pretrained=3", "model.pretrained: expected str, got 3 (int)"),
        ("model.side_dims=5", "model.side_dims: expected list[int], got 5 (int)"),
        ("model.side_dims=[1, x]", "model.side_dims[1]: expected int, got 'x' (str)"),
        ("data.crop=[1, 2, 3]", "data.crop: expected tuple[int, int] (2 items), got [1, 2, 3] (list)"),
        ("data.mean=[0.5, bad]", "data.mean[1]: expected float, got 'bad' (str)"),
        ("data.extra=[1]", "data.extra: expected dict[str, int], got [1] (list)"),
        ("data.extra={a: x}", "data.extra.a: expected int, got 'x' (str)"),
        ("model=5", "model: expected ModelCfg section (mapping), got 5 (int)"),
    ],
)
def test_type_errors_name_dotted_key(override, message):
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, overrides=[override])
    assert str(ei.value) == message


def test_type_error_in_yaml_names_dotted_key(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"train": {"optim": {"betas": [0.9, "x"]}}})
    with pytest.raises(ConfigError, match=r"^train\.optim\.betas\[1\]: expected float, got 'x' \(str\)$"):
        load_config(Cfg, p)


def test_literal_accepts_choice_and_rejects_others():
    assert load_config(Cfg, overrides=["model.arch=vit_l14"]).model.arch == "vit_l14"
    with pytest.raises(ConfigError, match=r"^loss\.level: expected one of 0, 1, 2, got True \(bool\)$"):
        load_config(Cfg, overrides=["loss.level=true"])  # True == 1, but is not an int choice
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, overrides=["model.arch=vit_h14"])
    msg = str(ei.value)
    assert msg.startswith("model.arch: expected one of")
    assert "'vit_b16'" in msg and "'vit_l14'" in msg and "'vit_h14'" in msg


# ----------------------------------------------------------------------------- unknown keys / bad input


def test_unknown_key_in_yaml_suggests(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"model": {"num_frame": 16}})
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, p)
    assert str(ei.value) == "unknown config key 'model.num_frame'; did you mean 'model.num_frames'?"


def test_unknown_key_deep_in_yaml(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"train": {"optim": {"lrr": 0.1}}})
    with pytest.raises(ConfigError, match=r"'train\.optim\.lrr'; did you mean 'train\.optim\.lr'\?"):
        load_config(Cfg, p)


def test_unknown_key_in_override_suggests():
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, overrides=["train.optim.bettas=[0.9, 0.9]"])
    assert str(ei.value) == "unknown config key 'train.optim.bettas'; did you mean 'train.optim.betas'?"
    with pytest.raises(ConfigError, match=r"unknown config key 'sed'; did you mean 'seed'\?"):
        load_config(Cfg, overrides=["sed=1"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, overrides=["model.zzzz=1"])
    msg = str(ei.value)
    assert "did you mean" not in msg
    assert msg.startswith("unknown config key 'model.zzzz'; valid keys under 'model':")
    for name in ("name", "num_frames", "pretrained", "drop_path", "arch", "side_dims"):
        assert name in msg


def test_subkey_of_non_section_is_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot set 'model\.name\.x'.*'model\.name'.*not a section"):
        load_config(Cfg, overrides=["model.name.x=1"])
    p = write_yaml(tmp_path / "c.yaml", {"model": {"name": {"x": 1}}})
    with pytest.raises(ConfigError, match=r"^model\.name: expected str"):
        load_config(Cfg, p)


@pytest.mark.parametrize("bad", ["model.num_frames", "=5", " =5", "model..name=x"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="invalid override"):
        load_config(Cfg, overrides=[bad])


@pytest.mark.parametrize("bad", ["model.num_frames", "=5"])
def test_override_without_key_value_form_explains_it(bad):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Cfg, overrides=[bad])


def test_override_with_unparsable_value():
    with pytest.raises(ConfigError, match=r"override 'model\.side_dims'"):
        load_config(Cfg, overrides=["model.side_dims=[1,"])


def test_single_string_overrides_rejected():
    with pytest.raises(TypeError):
        load_config(Cfg, overrides="seed=1")  # type: ignore[arg-type]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as ei:
        load_config(Cfg, missing)
    assert str(missing) in str(ei.value)


def test_non_mapping_yaml(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping") as ei:
        load_config(Cfg, p)
    assert str(p) in str(ei.value)


def test_invalid_yaml_syntax(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Cfg, p)


# ----------------------------------------------------------------------------- dict / dump round trip


def test_config_to_dict_is_plain():
    d = config_to_dict(load_config(Cfg, overrides=["aux.weight=2"]))
    assert d["data"]["mean"] == [0.48, 0.46, 0.41] and type(d["data"]["mean"]) is list
    assert d["train"]["optim"] == {"lr": 1e-4, "betas": [0.9, 0.999]}
    assert d["aux"] == {"weight": 2.0}
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # YAML-safe


def test_config_from_dict_checks_and_builds():
    cfg = config_from_dict(Cfg, {"model": {"num_frames": 4}, "data": {"crop": [112, 112]}})
    assert cfg.model.num_frames == 4 and cfg.data.crop == (112, 112)
    with pytest.raises(ConfigError, match="did you mean 'model.num_frames'"):
        config_from_dict(Cfg, {"model": {"num_framez": 4}})
    with pytest.raises(ConfigError, match=r"^config: expected Cfg section"):
        config_from_dict(Cfg, [1, 2])  # type: ignore[arg-type]


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(
        Cfg,
        overrides=[
            "model.num_frames=16",
            "model.pretrained=null",
            "model.arch=vit_l14",
            "train.optim.lr=1e-5",
            "data.extra={k: 3}",
            "data.mean=[0.5,0.5,0.5]",
            "aux.weight=0.25",
        ],
    )
    out = dump_config(cfg, tmp_path / "sub" / "run.yaml")
    assert out == tmp_path / "sub" / "run.yaml"
    assert load_config(Cfg, out) == cfg
    assert os.listdir(tmp_path / "sub") == ["run.yaml"]  # no temp files left behind


def test_dump_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "run.yaml"
    target.write_text("original\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        dump_config(Cfg(), target)
    assert target.read_text() == "original\n"
    assert os.listdir(tmp_path) == ["run.yaml"]


# ----------------------------------------------------------------------------- validate hook

VALIDATE_LOG: list[str] = []


@dataclass
class LeafCfg:
    x: int = 0

    def validate(self) -> None:
        VALIDATE_LOG.append("leaf")


@dataclass
class MidCfg:
    leaf: LeafCfg = field(default_factory=LeafCfg)

    def validate(self) -> None:
        VALIDATE_LOG.append("mid")


@dataclass
class RootCfg:
    mid: MidCfg = field(default_factory=MidCfg)

    def validate(self) -> None:
        VALIDATE_LOG.append("root")


def test_validate_called_children_first():
    VALIDATE_LOG.clear()
    load_config(RootCfg, overrides=["mid.leaf.x=1"])
    assert VALIDATE_LOG == ["leaf", "mid", "root"]


def test_validate_error_propagates(tmp_path):
    assert load_config(Cfg, overrides=["train.epochs=10", "train.warmup_epochs=10"]).train.epochs == 10
    with pytest.raises(ConfigError, match=r"train\.warmup_epochs \(50\) > train\.epochs \(30\)"):
        load_config(Cfg, overrides=["train.warmup_epochs=50"])
    p = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 2}})
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        config_from_dict(Cfg, {"train": {"epochs": 1}})


def test_validate_runs_after_all_overrides():
    # an intermediate state (warmup 50 > epochs 30) is fine if the final one is valid
    cfg = load_config(Cfg, overrides=["train.warmup_epochs=50", "train.epochs=100"])
    assert cfg.train.warmup_epochs == 50


# ----------------------------------------------------------------------------- no mutation of defaults


def test_class_defaults_unchanged_after_loading_twice():
    before = copy.deepcopy(Cfg())
    a = load_config(Cfg, overrides=["model.side_dims=[1]", "data.extra={a: 1}", "train.optim.lr=0.1"])
    b = load_config(Cfg, overrides=["model.side_dims=[2, 3]", "data.extra={b: 2}", "seed=7"])
    assert Cfg() == before
    assert ModelCfg().side_dims == [320, 320] and DataCfg().extra == {}
    assert a.model.side_dims == [1] and a.data.extra == {"a": 1} and a.train.optim.lr == 0.1 and a.seed == 0
    assert b.model.side_dims == [2, 3] and b.data.extra == {"b": 2} and b.train.optim.lr == 1e-4
    # the frozen section default is one shared instance: overriding must replace, not mutate it
    shared = Cfg().loss
    d = load_config(Cfg, overrides=["loss.label_smoothing=0.2", "loss.level=2"])
    assert d.loss == LossCfg(label_smoothing=0.2, level=2)
    assert shared == LossCfg() and Cfg().loss is shared
    c = load_config(Cfg)
    assert c == before and c.model.side_dims is not load_config(Cfg).model.side_dims


def test_merging_does_not_mutate_input_mapping():
    data = {"model": {"num_frames": 4}}
    config_from_dict(Cfg, data)
    assert data == {"model": {"num_frames": 4}}
