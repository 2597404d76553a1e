"""The experiment configuration: defaults here, a recipe YAML on top, `key=value` overrides last."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from s4v.config import ConfigError, load_config
from s4v.data.config import DataConfig
from s4v.model.specs import MODELS, closest


@dataclass
class ModelConfig:
    name: str = "s4v_b16"  # one of s4v.list_models()
    num_classes: int = 174  # classifier outputs
    num_frames: int = 8  # frames per clip T
    pretrained: Optional[str] = None  # local weights file of the frozen tower (None: random init)
    backbone_dtype: Literal["fp32", "fp16", "bf16"] = "bf16"  # dtype of the frozen tower
    grad_checkpointing: bool = False  # recompute side blocks in backward
    overrides: dict[str, Any] = field(default_factory=dict)  # spec fields, e.g. {"side.width": 128}

    def validate(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"model.name: unknown model {self.name!r}" + closest(self.name, MODELS))


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.15  # AdamW decay, on every trainable parameter by default (official recipe)
    no_decay_norm_bias: bool = False  # exclude biases, norms and position embeddings from decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 4.0  # linear warmup from 0, in epochs
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clipping (0: off)


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule still spans epochs)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1024  # each rank seeds with seed + rank
    output_dir: str = "runs"  # run directories go here
    run_name: Optional[str] = None  # default: <model>-job<SLURM_JOB_ID>, or <model>-<timestamp>
    resume: str = "auto"  # "auto": latest checkpoint of the run dir if any; "none"; or a checkpoint folder
    ckpt_every_steps: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    keep_checkpoints: int = 3  # complete checkpoints kept
    log_every_steps: int = 10
    sync_bn: bool = True  # BatchNorm statistics over all ranks
    max_nonfinite_steps: int = 20  # stop after this many consecutive NaN/inf losses
    deterministic: bool = False  # torch deterministic algorithms (slower; for exact-resume checks)
    export: bool = True  # write the side network + head (no backbone) at the end


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate during training every N epochs (0: only at the end)
    during_training_views: Literal["single", "full"] = "single"  # single centre view, as the official code
    at_end: bool = True  # full multi-view evaluation after training


@dataclass
class EngineConfig:
    ds_config: str = "ds_configs/zero2_bf16.json"  # DeepSpeed JSON: engine settings only
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        if self.data.num_frames != self.model.num_frames:
            raise ConfigError(f"model.num_frames={self.model.num_frames} but data.num_frames="
                              f"{self.data.num_frames}: set both to the clip length")
        from s4v.model.specs import apply_overrides, get_spec

        try:
            spec = apply_overrides(get_spec(self.model.name), self.model.overrides)
        except ValueError as err:
            raise ConfigError(f"model.overrides: {err}") from err
        if self.data.image_size != spec.backbone.image_size:
            raise ConfigError(f"data.image_size={self.data.image_size} but {self.model.name} takes "
                              f"{spec.backbone.image_size}px frames")


def load_experiment(path: Optional[str] = None, overrides=()) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, list(overrides))
