"""The experiment configuration: defaults here, a recipe YAML on top, `key=value` overrides last."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from s4v.config import ConfigError, load_config
from s4v.data.config import DataConfig
from s4v.model.retrieval_specs import RETRIEVAL_MODELS
from s4v.model.specs import MODELS, closest


def _require(key: str, value: Any, ok: bool, rule: str) -> None:
    """ConfigError naming the key of a zero or nonsense value (None means unset and is not checked)."""
    if value is not None and not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


@dataclass
class ModelConfig:
    name: str = "s4v_b16"  # one of s4v.list_models()
    num_classes: Union[int, Literal["auto"]] = "auto"  # classifier outputs; auto: the train index's class count
    num_frames: int = 8  # frames per clip T
    pretrained: Optional[str] = None  # local weights file of the frozen tower (None: random init)
    backbone_dtype: Literal["fp32", "fp16", "bf16"] = "bf16"  # dtype of the frozen tower
    grad_checkpointing: bool = False  # recompute side blocks in backward
    shard_backbone: bool = False  # split the frozen tower's weights over each node's ranks (needs `pretrained`)
    overrides: dict[str, Any] = field(default_factory=dict)  # spec fields, e.g. {"side.width": 128}

    def validate(self) -> None:
        if self.name not in MODELS and self.name not in RETRIEVAL_MODELS:
            raise ConfigError(f"model.name: unknown model {self.name!r}" + closest(self.name, [*MODELS, *RETRIEVAL_MODELS]))
        if isinstance(self.num_classes, int):
            _require("model.num_classes", self.num_classes, self.num_classes >= 1, ">= 1")
        _require("model.num_frames", self.num_frames, self.num_frames >= 1, ">= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.15  # AdamW decay, on every trainable parameter by default (official recipe)
    no_decay_norm_bias: bool = False  # exclude biases, norms and position embeddings from decay
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    eps: float = 1e-8  # Adam denominator epsilon
    warmup_epochs: float = 4.0  # linear warmup from 0, in epochs
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    label_smoothing: float = 0.1  # cross-entropy label smoothing (recognition)
    grad_clip: float = 1.0  # global gradient-norm clipping (0: off)
    optimizer: Literal["adamw", "bertadam"] = "adamw"  # bertadam: the official retrieval optimiser (no bias correction)
    schedule: Literal["cosine", "cosine_global"] = "cosine"  # cosine_global: cos over global progress (CLIP4Clip)

    def validate(self) -> None:
        _require("optim.lr", self.lr, self.lr > 0, "> 0")
        _require("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _require("optim.eps", self.eps, self.eps > 0, "> 0")
        _require("optim.betas", self.betas, all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")
        _require("optim.warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0")
        _require("optim.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _require("optim.label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)")
        _require("optim.grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0: off)")


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training split (>= 1)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule still spans epochs)
    global_batch_size: Optional[int] = None  # samples per optimizer step over all ranks (the recipe's); derives grad_accum
    grad_accum: Optional[int] = None  # micro-batches per optimizer step (default 1, or derived from global_batch_size)
    seed: int = 1024  # each rank seeds with seed + rank
    output_dir: str = "runs"  # run directories go here
    run_name: Optional[str] = None  # default: <model>-job<SLURM_JOB_ID>, or <model>-<timestamp>
    resume: str = "auto"  # "auto": latest checkpoint of the run dir if any; "none"; or a checkpoint folder
    ckpt_every_steps: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    keep_checkpoints: int = 3  # complete checkpoints kept
    log_every_steps: int = 10  # optimizer steps between metric rows
    sync_bn: bool = True  # BatchNorm statistics over all ranks
    max_nonfinite_steps: int = 20  # stop after this many consecutive NaN/inf losses
    max_skip_fraction: float = 0.05  # stop if more than this share of training samples cannot be read
    deterministic: bool = False  # torch deterministic algorithms (slower; for exact-resume checks)
    export: bool = True  # write the side network + head (no backbone) at the end
    log_samples: bool = False  # <run_dir>/samples/rank{R}.jsonl: epoch, step and sample keys of every micro-batch
    compile: Literal["none", "side", "side+tower"] = "none"  # torch.compile the side network (and the frozen tower's forward)

    def validate(self) -> None:
        for name in ("epochs", "max_steps", "keep_checkpoints", "log_every_steps", "max_nonfinite_steps"):
            value = getattr(self, name)  # max_steps: None is "no limit"; 0 would be a run of no step
            _require(f"train.{name}", value, value is None or value >= 1, ">= 1")
        for name in ("grad_accum", "global_batch_size"):  # None: derived (s4v.train.batching)
            value = getattr(self, name, None)
            _require(f"train.{name}", value, value is None or value >= 1, ">= 1 (or null)")
        _require("train.ckpt_every_steps", self.ckpt_every_steps, self.ckpt_every_steps >= 0, ">= 0 (0: epoch ends)")
        _require("train.max_skip_fraction", self.max_skip_fraction, 0 <= self.max_skip_fraction <= 1, "in [0, 1]")


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate during training every N epochs (0: only at the end)
    during_training_views: Literal["single", "full"] = "single"  # single centre view, as the official code
    at_end: bool = True  # full multi-view evaluation after training
    max_skip_fraction: float = 0.01  # fail the evaluation if more than this share of its videos cannot be read

    def validate(self) -> None:
        _require("eval.every_epochs", self.every_epochs, self.every_epochs >= 0, ">= 0 (0: only at the end)")
        _require("eval.max_skip_fraction", self.max_skip_fraction, 0 <= self.max_skip_fraction <= 1, "in [0, 1]")


@dataclass
class EngineConfig:
    ds_config: str = "ds_configs/zero2_bf16.json"  # DeepSpeed JSON: engine settings only
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # process group: auto = NCCL on GPUs, gloo on the CPU


@dataclass
class RetrievalConfig:
    """Text-video retrieval (task: retrieval; README, Text-video retrieval). `optim.lr` is the side-network lr."""

    max_words: int = 32  # text tokens incl. SOT/EOT (longer captions are cut)
    interaction: Literal["wti", "mean"] = "wti"  # WTI token-wise similarity, or mean-pooled cosine
    freeze_text: bool = False  # True: text tower frozen, outside the engine; False: trained at clip_lr
    clip_lr: float = 1e-7  # peak lr of the CLIP parts (text tower, ln_post/proj, temperature): 1e-4 x 1e-3
    max_temperature: float = 100.0  # cap of exp(logit_scale)
    no_decay_bias: bool = True  # no weight decay on parameters named *bias (the official BertAdam rule)
    caption_sampling: Literal["cycle", "random"] = "cycle"  # caption per (video, epoch): see s4v/data/captions.py
    eval_ties: Literal["pessimistic", "optimistic", "mean"] = "pessimistic"  # rank ties (s4v/eval/retrieval.py)
    eval_block: int = 256  # texts x videos scored per block at evaluation

    def validate(self) -> None:
        if self.max_words < 3:
            raise ConfigError(f"retrieval.max_words must be >= 3 (SOT, a word, EOT), got {self.max_words}")
        if self.clip_lr < 0 or self.max_temperature <= 0 or self.eval_block < 1:
            raise ConfigError("retrieval: clip_lr must be >= 0, max_temperature > 0 and eval_block >= 1")


@dataclass
class ExperimentConfig:
    task: Literal["recognition", "retrieval"] = "recognition"  # classifier, or text-video retrieval
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # used when task == "retrieval"

    def validate(self) -> None:
        if self.data.num_frames != self.model.num_frames:
            raise ConfigError(f"model.num_frames={self.model.num_frames} but data.num_frames="
                              f"{self.data.num_frames}: set both to the clip length")
        from s4v.model.retrieval_specs import apply_retrieval_overrides, get_retrieval_spec
        from s4v.model.specs import apply_overrides, get_spec

        retrieval_model = self.model.name in RETRIEVAL_MODELS
        if self.task == "retrieval" and not retrieval_model:
            raise ConfigError(f"task: retrieval needs a retrieval model (model.name one of "
                              f"{', '.join(sorted(RETRIEVAL_MODELS))}), got {self.model.name!r}")
        if self.task == "recognition" and retrieval_model:
            raise ConfigError(f"model.name={self.model.name!r} is a retrieval model: set task: retrieval")
        if self.task == "retrieval" and self.data.repeated_aug != 1:
            raise ConfigError("task: retrieval takes one view per video (data.repeated_aug: 1): repeated "
                              "copies of a video would be false negatives of each other")
        try:
            spec = (apply_retrieval_overrides(get_retrieval_spec(self.model.name), self.model.overrides)
                    if retrieval_model else apply_overrides(get_spec(self.model.name), self.model.overrides))
        except ValueError as err:
            raise ConfigError(f"model.overrides: {err}") from err
        if self.data.image_size != spec.backbone.image_size:
            raise ConfigError(f"data.image_size={self.data.image_size} but {self.model.name} takes "
                              f"{spec.backbone.image_size}px frames")
        from s4v.model.towers import family_info

        fam = family_info(spec.backbone.family)  # the tower only works on inputs normalised as it was trained
        defaults = DataConfig()
        if _close(self.data.mean, defaults.mean) and _close(self.data.std, defaults.std):  # not set: the tower's
            self.data = dataclasses.replace(self.data, mean=tuple(fam.mean), std=tuple(fam.std))
        if not (_close(self.data.mean, fam.mean) and _close(self.data.std, fam.std)):
            raise ConfigError(f"data.mean={list(self.data.mean)} data.std={list(self.data.std)} but "
                              f"{self.model.name}'s {spec.backbone.family} tower expects mean {list(fam.mean)} "
                              f"std {list(fam.std)}")


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(float(x) - y) < 1e-6 for x, y in zip(a, b))


def load_experiment(path: Optional[str] = None, overrides=()) -> ExperimentConfig:
    cfg = load_config(ExperimentConfig, path, list(overrides))
    if cfg.data.output_dtype == "auto":  # half-precision video for a half-precision tower (DALI; it casts anyway)
        half = cfg.data.loader == "dali" and cfg.model.backbone_dtype in ("fp16", "bf16")
        cfg.data.output_dtype = "float16" if half else "float32"
    return cfg
