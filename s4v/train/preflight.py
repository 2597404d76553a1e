"""Start-up checks of a training run (`preflight`) and the settings derived from the experiment before
the engine exists: the world size the launcher asked for, the DeepSpeed config, the label range."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from s4v.experiment import ExperimentConfig
from s4v.train.engine import build_ds_config, load_ds_json


def job_world_size() -> int:
    """The world size the launcher asked for (torchrun's WORLD_SIZE, or Slurm's SLURM_NTASKS), known
    before the process group exists."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def preflight(cfg: ExperimentConfig, world_size: int) -> None:
    """Cheap checks of everything a run needs, before the model is built or any data is read, so that a
    typo fails in seconds with the key to fix, not after minutes of start-up (or on one rank of many).

    Files: data.root, the train (and, if evaluating, val) split index and every shard it lists,
    model.pretrained, engine.ds_config (valid JSON, no conflict with the batch the experiment gives for
    this world size, no fp16 on CPU), an explicit train.resume folder. Sizes: at least
    train.grad_accum batches per rank per epoch at this world size. Raises ConfigError."""
    from s4v.config import ConfigError
    from s4v.data.augment import num_views
    from s4v.data.format import INDEX_NAME, SplitIndex
    from s4v.data.shards import batches_per_epoch

    d, problems = cfg.data, []
    splits = [d.train_split] + ([d.val_split] if cfg.eval.at_end or cfg.eval.every_epochs else [])
    train_samples = None
    if not d.root or not Path(d.root).is_dir():
        problems.append(f"data.root: no folder {d.root!r}")
    else:
        for split in dict.fromkeys(splits):
            try:
                index = SplitIndex.load(d.root, split)
            except FileNotFoundError:
                problems.append(f"data.root: no split index {Path(d.root) / INDEX_NAME.format(split=split)} "
                                f"(split {split!r}; create shards with `python -m data_prep.shard`)")
                continue
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"data.root: unreadable split index for {split!r}: {err}")
                continue
            missing = [s.name for s in index.shards if not (Path(d.root) / s.name).is_file()]
            if missing:
                problems.append(f"data.root: {len(missing)} of {len(index.shards)} {split!r} shards are missing "
                                f"under {d.root}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
            if split == d.train_split:
                train_samples = index.num_samples
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        problems.append(f"model.pretrained: no weights file {cfg.model.pretrained!r}")
    if cfg.model.shard_backbone and not cfg.model.pretrained:
        problems.append("model.shard_backbone needs model.pretrained: a sharded tower is loaded from its weights "
                        "file, not saved with the run")
    if cfg.train.grad_accum < 1:
        problems.append(f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}")
    elif train_samples is not None:
        batches = batches_per_epoch(train_samples, world_size, d.batch_size, train=True)
        if batches < cfg.train.grad_accum:
            problems.append(f"data.batch_size={d.batch_size}: {train_samples} training samples over {world_size} "
                            f"ranks give {batches} batches per rank per epoch, fewer than train.grad_accum="
                            f"{cfg.train.grad_accum}; use more data, fewer ranks or smaller batches")
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).is_dir():
        problems.append(f"train.resume: no checkpoint folder {cfg.train.resume!r} (use auto, none or a folder)")
    try:
        experiment_ds_config(cfg, d.batch_size * num_views(d, True), max(1, cfg.train.grad_accum), world_size,
                             "cuda" if torch.cuda.is_available() else "cpu")
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"engine.ds_config: {err}")
    if problems:
        raise ConfigError("s4v train: cannot start:\n  - " + "\n  - ".join(problems))


def experiment_ds_config(cfg: ExperimentConfig, micro_batch: int, grad_accum: int, world_size: int,
                         device_type: str) -> dict:
    """The DeepSpeed config of `cfg`: its JSON plus the batch, clipping and optimizer of the YAML."""
    o = cfg.optim
    return build_ds_config(load_ds_json(cfg.engine.ds_config), micro_batch=micro_batch, grad_accum=grad_accum,
                           world_size=world_size, grad_clip=o.grad_clip, lr=o.lr, betas=o.betas, eps=o.eps,
                           weight_decay=o.weight_decay, device_type=device_type, optimizer=o.optimizer)


def with_label_range(cfg: ExperimentConfig) -> ExperimentConfig:
    """Recognition: the loaders skip (and count) labels outside [0, model.num_classes) instead of
    handing the loss a wrong class or an index error."""
    if cfg.task == "recognition" and cfg.data.num_classes is None:
        cfg.data = dataclasses.replace(cfg.data, num_classes=cfg.model.num_classes)
    return cfg
