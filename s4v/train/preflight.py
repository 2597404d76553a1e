"""Start-up checks of a training run (`preflight`) and the settings derived from the experiment before
the engine exists: the world size the launcher asked for, the DeepSpeed config, the label range."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from s4v.experiment import ExperimentConfig
from s4v.train.batching import BatchPlan, BatchPlanError, plan_batches
from s4v.train.engine import build_ds_config, load_ds_json


def job_world_size() -> int:
    """The world size the launcher asked for (torchrun's WORLD_SIZE, or Slurm's SLURM_NTASKS), known
    before the process group exists."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def preflight(cfg: ExperimentConfig, world_size: int) -> None:
    """Cheap checks of everything a run needs, before the model is built or any data is read, so that a
    typo fails in seconds with the key to fix, not after minutes of start-up (or on one rank of many).

    Files: data.root, the train (and, if evaluating, val) split index and every shard it lists, the
    splits' codecs (readable by data.loader on data.device) and class lists (the same in every split),
    model.num_classes (auto, or the train index's class count), model.pretrained, engine.ds_config
    (valid JSON, no conflict with the batch the experiment gives for this world size, no fp16 on CPU),
    an explicit train.resume folder. Batch: train.global_batch_size
    divisible at this world size (s4v.train.batching), and at least one optimizer step's micro-batches per
    rank per epoch. Raises ConfigError."""
    from s4v.config import ConfigError
    from s4v.data.augment import num_views
    from s4v.data.shards import batches_per_epoch
    from s4v.data.split_checks import check_splits

    d = cfg.data
    splits = [d.train_split] + ([d.val_split] if cfg.eval.at_end or cfg.eval.every_epochs else [])
    indices, problems = check_splits(d, splits, cuda=torch.cuda.is_available())
    train_index = indices.get(d.train_split)
    train_samples = train_index.num_samples if train_index else None
    if cfg.task == "recognition" and train_index:
        problem = num_classes_problem(cfg.model.num_classes, train_index.classes, d.train_split)
        if problem:
            problems.append(problem)
    if cfg.model.pretrained:  # a file, or a tag / hf-hub: name found offline in the Hugging Face cache
        problem = pretrained_problem(cfg)
        if problem:
            problems.append(f"model.pretrained: {problem}")
    if cfg.model.shard_backbone and not cfg.model.pretrained:
        problems.append("model.shard_backbone needs model.pretrained: a sharded tower is loaded from its weights "
                        "file, not saved with the run")
    try:
        plan = batch_plan(cfg, world_size)
    except BatchPlanError as err:
        problems.append(str(err))
        plan = None
    if plan is not None and cfg.task == "retrieval" and plan.grad_accum > 1:
        # the contrastive loss takes its negatives from one step's batch: accumulation is another loss
        problems.append(f"task: retrieval does not accumulate gradients ({plan.describe()}): the contrastive "
                        f"loss takes its negatives from the global batch of one step; set data.batch_size="
                        f"{plan.global_batch // world_size} so that {world_size} ranks hold the global batch")
    if plan is not None and train_samples is not None:
        batches = batches_per_epoch(train_samples, world_size, d.batch_size, train=True)
        if batches < plan.grad_accum:
            problems.append(f"data.batch_size={d.batch_size}: {train_samples} training samples over {world_size} "
                            f"ranks give {batches} batches per rank per epoch, fewer than the {plan.grad_accum} "
                            f"micro-batches of an optimizer step ({plan.describe()}); use more data, fewer ranks "
                            f"or smaller batches")
    if cfg.train.resume not in ("auto", "none"):
        problems += resume_problems(cfg.train.resume)
    try:
        experiment_ds_config(cfg, d.batch_size * num_views(d, True), plan.grad_accum if plan else 1, world_size,
                             "cuda" if torch.cuda.is_available() else "cpu")
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"engine.ds_config: {err}")
    if problems:
        raise ConfigError("s4v train: cannot start:\n  - " + "\n  - ".join(problems))


def pretrained_problem(cfg: ExperimentConfig) -> str | None:
    """Why `model.pretrained` cannot be used, or None."""
    from s4v.model.pretrained import resolve_pretrained
    from s4v.model.specs import get_spec
    from s4v.model.weights_file import WeightsFileError

    value = cfg.model.pretrained
    if Path(value).is_file():
        return None
    if "/" in value and not value.startswith("hf-hub:") and not Path(value).is_dir():
        return f"no weights file {value!r}"
    try:
        resolve_pretrained(get_spec(cfg.model.name).backbone, value)
    except (FileNotFoundError, WeightsFileError, ValueError, KeyError) as err:
        return f"{value!r} is neither a weights file nor a name found in the local Hugging Face cache: {err}"
    return None


def resume_problems(resume: str) -> list[str]:
    """Why an explicit `train.resume` folder cannot be resumed from (before the run folder is made)."""
    from s4v.train.checkpoint import CheckpointError, complete_tags, resolve_resume

    if not Path(resume).is_dir():
        return [f"train.resume: no checkpoint folder {resume!r} (use auto, none or a folder)"]
    try:
        ckpt_dir, tag = resolve_resume(resume)
    except CheckpointError as err:
        return [str(err)]
    if tag is None and not complete_tags(ckpt_dir):
        return [f"train.resume={resume}: {ckpt_dir} holds no checkpoint yet (train.resume=auto starts fresh "
                "when there is none)"]
    return []


def batch_plan(cfg: ExperimentConfig, world_size: int) -> BatchPlan:
    """The run's micro-batch, accumulation and global batch at this world size (raises BatchPlanError)."""
    t = cfg.train
    return plan_batches(cfg.data.batch_size, world_size, t.global_batch_size, t.grad_accum)


def experiment_ds_config(cfg: ExperimentConfig, micro_batch: int, grad_accum: int, world_size: int,
                         device_type: str) -> dict:
    """The DeepSpeed config of `cfg`: its JSON plus the batch, clipping and optimizer of the YAML."""
    o = cfg.optim
    return build_ds_config(load_ds_json(cfg.engine.ds_config), micro_batch=micro_batch, grad_accum=grad_accum,
                           world_size=world_size, grad_clip=o.grad_clip, lr=o.lr, betas=o.betas, eps=o.eps,
                           weight_decay=o.weight_decay, device_type=device_type, optimizer=o.optimizer)


def num_classes_problem(num_classes: int | str, classes: list[str], split: str) -> str | None:
    """Why model.num_classes does not fit the train index's class list, or None."""
    if num_classes == "auto":
        if not classes:
            return (f"model.num_classes: auto takes the class count from the {split!r} index, which lists no "
                    "classes; set model.num_classes")
    elif classes and num_classes != len(classes):
        effect = (f"labels >= {num_classes} would be skipped" if num_classes < len(classes)
                  else f"{num_classes - len(classes)} outputs would never be trained")
        return (f"model.num_classes={num_classes} but split {split!r} has {len(classes)} classes: {effect}; "
                "use model.num_classes=auto (the index's count)")
    return None


def with_label_range(cfg: ExperimentConfig) -> ExperimentConfig:
    """Recognition: `model.num_classes: auto` becomes the train index's class count, and the loaders
    skip (and count) labels outside [0, model.num_classes) instead of handing the loss a wrong class or
    an index error. Call after `preflight`, which checks the index."""
    if cfg.task == "recognition" and cfg.model.num_classes == "auto":
        from s4v.data.format import SplitIndex

        count = len(SplitIndex.load(cfg.data.root, cfg.data.train_split).classes)
        cfg.model = dataclasses.replace(cfg.model, num_classes=count)
    if cfg.task == "recognition" and cfg.data.num_classes is None:
        cfg.data = dataclasses.replace(cfg.data, num_classes=cfg.model.num_classes)
    return cfg
