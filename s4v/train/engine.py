"""The DeepSpeed engine around the trainable side network and head (the only file, with
checkpoint.py, that imports DeepSpeed). The frozen backbone stays outside the engine."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from s4v.model.classifier import Side4VideoClassifier

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


class TrainableSide(nn.Module):
    """What DeepSpeed owns: side network + head, fed with the video and the backbone's taps."""

    def __init__(self, model: Side4VideoClassifier):
        super().__init__()
        self.side, self.head = model.side, model.head

    def forward(self, video: torch.Tensor, taps) -> torch.Tensor:
        return self.head(self.side(video, taps), video.shape[0])


def resolve_ds_config_path(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"DeepSpeed config {path!r} not found (looked in . and {REPO_ROOT})")


def build_ds_config(base: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int,
                    grad_clip: float, lr: float, betas, eps: float, weight_decay: float,
                    device_type: str, optimizer: str = "adamw") -> dict[str, Any]:
    """The engine settings from the JSON plus what the experiment YAML owns (batch, clipping, optimizer).
    A JSON that sets those differently is an error, so that exactly one file owns each knob."""
    cfg = copy.deepcopy(base)
    for owned in ("optimizer", "scheduler"):
        if owned in cfg:
            raise ValueError(f"the DeepSpeed JSON sets '{owned}'; the optimizer and LR schedule belong in "
                             "the experiment YAML (optim.*)")
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "train_batch_size": micro_batch * grad_accum * world_size, "gradient_clipping": grad_clip}
    for key, value in wanted.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"DeepSpeed JSON sets {key}={cfg[key]} but the experiment gives {value} "
                             f"(micro batch {micro_batch} x accumulation {grad_accum} x {world_size} ranks); "
                             "remove it from the JSON")
        cfg[key] = value
    if device_type != "cuda" and cfg.get("fp16", {}).get("enabled"):
        raise ValueError("fp16 training needs a GPU (DeepSpeed refuses fp16 on CPU); use a bf16 or fp32 "
                         "DeepSpeed config, e.g. ds_configs/zero2_bf16.json")
    if optimizer == "adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
            "torch_adam": True, "adam_w_mode": True}}
    elif optimizer == "bertadam":  # a client optimizer (s4v.train.bertadam), built in `deepspeed_initialize`
        cfg["zero_allow_untested_optimizer"] = True
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use adamw or bertadam")
    cfg.setdefault("steps_per_print", 10 ** 9)  # s4v logs itself
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def param_groups(module: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """All trainable parameters; optionally without decay on biases, norms and the position embedding."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_decay_norm_bias and (p.ndim <= 1 or name.endswith("pos_embed")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                  global_progress: bool = False) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine to `min_ratio` at `total_steps` (docs/method.md 6.1).
    `global_progress`: the cosine runs over the whole schedule, warmup included (CLIP4Clip's
    `warmup_cosine`, docs/method.md 6.2), so it starts at 0.5 (1 + cos(pi warmup/total)) after warmup."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        start = 0 if global_progress else warmup_steps
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def deepspeed_initialize(module: nn.Module, ds_config: dict[str, Any], groups: list[dict],
                         lr_lambda: Callable[[int], float], optim) -> tuple:
    """deepspeed.initialize over what the engine owns, with `optim` (an `OptimConfig`) picking the
    optimizer: DeepSpeed's AdamW from the JSON, or a client `BertAdam` over the same parameter groups.
    Returns (engine, optimizer, scheduler)."""
    import deepspeed

    client = None
    if optim.optimizer == "bertadam":
        from s4v.train.bertadam import BertAdam

        client = BertAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    printed = io.StringIO()  # DeepSpeed prints "... shm_comm_op built successfully" at every CPU start
    with contextlib.redirect_stdout(printed):
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module, model_parameters=None if client else groups, optimizer=client, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), dist_init_required=False)
    if printed.getvalue().strip():
        log.debug("deepspeed.initialize printed: %s", printed.getvalue().strip())
    return engine, optimizer, scheduler


def load_ds_json(path: str) -> dict[str, Any]:
    resolved = resolve_ds_config_path(path)
    try:
        return json.loads(resolved.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{resolved}: invalid JSON: {err}") from err


def full_parameters(engine):
    """Context in which every parameter of the engine's module holds its full value on every rank:
    ZeRO-3 gathers its partitions (a collective: call it on all ranks); other stages need nothing."""
    import deepspeed

    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
