"""`train(cfg)`: the whole training run, top to bottom, and `train_step`.

The frozen backbone runs outside the DeepSpeed engine under no_grad; the engine owns the side network
and head. Checkpoints hold the exact data position and RNG states of every rank, so a resumed run
continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import s4v
from s4v.data.loader import build_loader
from s4v.eval.evaluate import evaluate
from s4v.experiment import ExperimentConfig
from s4v.model.checkpoint_io import save_model
from s4v.train import checkpoint
from s4v.train.dist import (DistInfo, PreemptionFlag, all_reduce_max, barrier, broadcast_object,
                            init_distributed, requeue_slurm_job)
from s4v.train.engine import (build_ds_config, initialize_engine, load_ds_json, param_groups,
                              warmup_cosine)
from s4v.train.metrics import Meter, MetricLogger, confusion_image, memory_stats
from s4v.train.run_dir import default_run_name, write_run_description
from s4v.train.sync_bn import convert_sync_token_bn

log = logging.getLogger("s4v.train")


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def setup_logging(run_dir: Optional[Path], rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / f"train_rank{rank}.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        handlers=handlers)


def build_training_model(cfg: ExperimentConfig, info: DistInfo):
    m = cfg.model
    model = s4v.create_model(m.name, m.num_classes, m.num_frames, pretrained=m.pretrained,
                             device=info.device, backbone_dtype=m.backbone_dtype, **m.overrides)
    model.set_grad_checkpointing(m.grad_checkpointing)
    if cfg.train.sync_bn and info.world_size > 1:
        convert_sync_token_bn(model.side)
        convert_sync_token_bn(model.head)
    return model


def single_view(data_cfg):
    """The data config of the quick during-training evaluation: one centre crop, one clip."""
    return dataclasses.replace(data_cfg, test_crops=1, test_clips=1)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, argv: list[str]):
        self.cfg = cfg
        self.info = info = init_distributed(cfg.engine.backend)
        seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic)
        run_name = cfg.train.run_name or broadcast_object(default_run_name(cfg.model.name))
        self.run_dir = Path(cfg.train.output_dir) / run_name
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        setup_logging(self.run_dir, info.rank)
        self.ckpt_dir = self.run_dir / "checkpoints"

        self.model = build_training_model(cfg, info)
        d = cfg.data
        self.train_loader = build_loader(d, d.train_split, train=True, rank=info.rank,
                                         world_size=info.world_size, epoch=0, device=info.device.type)
        self.steps_per_epoch = len(self.train_loader) // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.train_loader)} batches per rank, fewer than "
                             f"train.grad_accum={cfg.train.grad_accum}; use more data or smaller batches")
        total = cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        ds_config = build_ds_config(
            load_ds_json(cfg.engine.ds_config), micro_batch=self.train_loader.clips_per_batch,
            grad_accum=cfg.train.grad_accum, world_size=info.world_size, grad_clip=cfg.optim.grad_clip,
            lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, device_type=info.device.type)
        groups = param_groups(self.model.trainable_modules(), cfg.optim.weight_decay,
                              cfg.optim.no_decay_norm_bias)
        self.engine, self.optimizer, self.scheduler = initialize_engine(
            self.model, ds_config, groups, warmup_cosine(total, warmup, cfg.optim.min_lr_ratio))
        if info.is_main:
            write_run_description(self.run_dir, cfg, ds_config, argv)
        self.logger = MetricLogger(self.run_dir, enabled=info.is_main)
        self.epoch, self.step, self.best_top1 = 0, 0, float("nan")
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.preempt = PreemptionFlag()

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        taps = self.model.backbone(video.flatten(0, 1))  # no_grad, frozen tower dtype
        return self.engine(video, taps)

    def train_step(self, batch: dict) -> Optional[float]:
        """One micro-batch: forward, loss, backward, (boundary) optimizer step. None if skipped."""
        video = batch["video"].to(self.info.device, non_blocking=True)
        labels = batch["label"].to(self.info.device, non_blocking=True)
        valid = batch["valid"].to(self.info.device) if "valid" in batch else torch.ones_like(labels, dtype=torch.bool)
        logits = self.forward(video)
        # Slots of samples that failed to decode hold copies of good ones; they do not count.
        losses = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing,
                                 reduction="none")
        loss = (losses * valid).sum() / valid.sum().clamp_min(1)
        if all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0:  # all ranks skip together
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            log.warning("non-finite loss at step %d (keys %s); step skipped (%d in a row)", self.step,
                        list(batch.get("key", []))[:4], self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} consecutive non-finite losses at step {self.step}; stopping. "
                    f"The last good checkpoint is in {self.ckpt_dir} (lower optim.lr, or check the data).")
            return None
        self.nonfinite_in_a_row = 0
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        client = {"epoch": self.epoch, "step": self.step, "best_top1": self.best_top1,
                  "nonfinite_total": self.nonfinite_total}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": checkpoint.rng_state()}
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, rank_state,
                              self.cfg.train.keep_checkpoints)
        log.info("saved checkpoint %s", self.ckpt_dir / tag)

    def maybe_resume(self) -> None:
        mode = self.cfg.train.resume
        if mode == "none":
            return
        ckpt_dir, tag = self.ckpt_dir, None
        if mode != "auto":
            path = Path(mode)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume: no checkpoint folder {path}")
            ckpt_dir, tag = path.parent, path.name
        loaded = checkpoint.load(self.engine, ckpt_dir, tag)
        if loaded is None:
            return
        client, mine = loaded
        self.epoch, self.step = client["epoch"], client["step"]
        self.best_top1 = client.get("best_top1", float("nan"))
        self.nonfinite_total = client.get("nonfinite_total", 0)
        self.train_loader.load_state_dict(mine["loader"])
        checkpoint.set_rng_state(mine["rng"])
        log.info("resumed from %s at epoch %d, step %d", ckpt_dir, self.epoch, self.step)

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, full_views: bool) -> dict:
        d = self.cfg.data if full_views else single_view(self.cfg.data)
        loader = build_loader(d, d.val_split, train=False, rank=self.info.rank,
                              world_size=self.info.world_size, epoch=0, device=self.info.device.type)
        self.engine.eval()
        try:
            report = evaluate(self.forward, loader, self.cfg.model.num_classes, self.info.device,
                              progress=self.info.is_main)
        finally:
            self.engine.train()
        prefix = "val" if full_views else "val_single"
        self.logger.log(self.step, {f"{prefix}/top1": report["top1"], f"{prefix}/top5": report["top5"],
                                    f"{prefix}/mean_class_acc": report["mean_class_acc"]})
        self.logger.image(f"{prefix}/confusion", confusion_image(report["confusion"]), self.step)
        log.info("%s at step %d: top1 %.4f top5 %.4f mean-class %.4f (%d clips)", prefix, self.step,
                 report["top1"], report["top5"], report["mean_class_acc"], report["num_samples"])
        return report

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        self.maybe_resume()
        max_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        loss_meter, data_meter, step_meter = Meter(), Meter(), Meter()
        status = "finished"
        while self.epoch < cfg.train.epochs and self.step < max_steps:
            self.train_loader.set_epoch(self.epoch)  # keeps a restored mid-epoch position
            bar = tqdm(total=self.steps_per_epoch, initial=self.train_loader.batches_done // cfg.train.grad_accum,
                       desc=f"epoch {self.epoch}", disable=not info.is_main, dynamic_ncols=True)
            tick = time.perf_counter()
            for batch in self.train_loader:
                data_meter.update(time.perf_counter() - tick)
                loss = self.train_step(batch)
                if loss is not None:
                    loss_meter.update(loss)
                step_meter.update(time.perf_counter() - tick)
                if not self.engine.is_gradient_accumulation_boundary() and loss is not None:
                    tick = time.perf_counter()
                    continue
                self.step += 1
                bar.update(1)
                if self.step % cfg.train.log_every_steps == 0:
                    self.log_train(loss_meter, data_meter, step_meter, batch["video"].shape[0])
                    bar.set_postfix(loss=f"{loss_meter.mean or float('nan'):.4f}")
                    loss_meter.reset(), data_meter.reset(), step_meter.reset()
                if cfg.train.ckpt_every_steps and self.step % cfg.train.ckpt_every_steps == 0:
                    self.save()
                if self.preempt.agreed():
                    self.save()
                    status = "preempted"
                    break
                if self.step >= max_steps:
                    break
                tick = time.perf_counter()
            bar.close()
            if status == "preempted":
                break
            loader = self.train_loader
            if loader.epoch > self.epoch or loader.batches_done >= len(loader):  # epoch complete
                self.epoch += 1
                if cfg.eval.every_epochs and self.epoch % cfg.eval.every_epochs == 0:
                    self.best_top1 = max(self.evaluate(full_views=cfg.eval.during_training_views == "full")["top1"],
                                         self.best_top1 if not math.isnan(self.best_top1) else -1.0)
            self.save()
        result = {"status": status, "epoch": self.epoch, "step": self.step, "run_dir": str(self.run_dir),
                  "skipped_samples": self.train_loader.skipped, "nonfinite_steps": self.nonfinite_total}
        if status == "preempted":
            if info.is_main:
                requeue_slurm_job()
            return result
        if cfg.eval.at_end:
            report = self.evaluate(full_views=True)
            result.update(val_top1=report["top1"], val_top5=report["top5"],
                          val_mean_class_acc=report["mean_class_acc"])
        if cfg.train.export:
            self.export()
        self.logger.flush()
        return result

    def log_train(self, loss: Meter, data: Meter, step: Meter, clips: int) -> None:
        values = {"train/loss": loss.mean, "train/lr": self.scheduler.get_last_lr()[0],
                  "train/grad_norm": _grad_norm(self.engine), "perf/data_wait_s": data.mean,
                  "perf/step_s": step.mean,
                  "perf/clips_per_s": clips * self.info.world_size / step.mean if step.mean else None,
                  "train/skipped_samples": self.train_loader.skipped,
                  "train/nonfinite_steps": self.nonfinite_total, "train/epoch": self.epoch}
        if getattr(self.engine, "skipped_steps", None) is not None:
            values["train/overflow_steps"] = self.engine.skipped_steps
        values.update(memory_stats(self.info.device))
        self.logger.log(self.step, values)

    def export(self) -> Optional[Path]:
        """The side network + head alone (fp32 master weights), for release; rank 0 writes it.
        Loading it needs the tower's weights file too (`load_model(path, pretrained=...)`)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        barrier()
        path = self.run_dir / "model_side_head.pt"
        if self.info.is_main:
            tag = checkpoint.latest_tag(self.ckpt_dir)
            sd = get_fp32_state_dict_from_zero_checkpoint(str(self.ckpt_dir), tag=tag)
            self.model.load_state_dict(
                {**{k: v for k, v in self.model.state_dict().items() if k.startswith("backbone.")},
                 **{k: v.float() for k, v in sd.items()},
                 **{k: v for k, v in self.engine.module.state_dict().items() if "running" in k
                    or "num_batches_tracked" in k}}, strict=False)
            # A randomly initialised tower cannot be rebuilt from a file: keep it in the export then.
            save_model(self.model, path, include_backbone=self.cfg.model.pretrained is None)
            log.info("exported side network + head to %s", path)
        barrier()
        return path


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def train(cfg: ExperimentConfig, argv: Optional[list[str]] = None) -> dict:
    trainer = Trainer(cfg, argv or [])
    return trainer.fit()
