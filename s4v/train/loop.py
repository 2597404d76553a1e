"""`train(cfg)`: the whole training run, top to bottom, and `train_step`.

The frozen backbone runs outside the DeepSpeed engine under no_grad; the engine owns the side network
and head (recognition) or the side network, heads and text tower (retrieval). What differs between the
tasks (model, engine module, parameter groups, loss, evaluation, export) is in `s4v.train.tasks`.
Checkpoints hold the exact data position and RNG states of every rank, so a resumed run continues
exactly where the interrupted one stopped.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from s4v.data.loader import build_loader
from s4v.experiment import ExperimentConfig
from s4v.train import checkpoint
from s4v.train.dist import (PreemptionFlag, all_reduce_max, barrier, broadcast_object,
                            init_distributed, requeue_slurm_job)
from s4v.train.engine import warmup_cosine
from s4v.train.metrics import Meter, MetricLogger, memory_stats
from s4v.train.preflight import experiment_ds_config, job_world_size, preflight, with_label_range
from s4v.train.run_dir import default_run_name, write_run_description
from s4v.train.tasks import make_task

log = logging.getLogger("s4v.train")


class NonFiniteLossError(RuntimeError):
    pass


class DataSkipError(RuntimeError):
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


class Trainer:
    def __init__(self, cfg: ExperimentConfig, argv: list[str]):
        preflight(cfg, job_world_size())
        self.cfg = cfg = with_label_range(cfg)
        self.info = info = init_distributed(cfg.engine.backend)
        seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic)
        run_name = cfg.train.run_name or broadcast_object(default_run_name(cfg.model.name))
        self.run_dir = Path(cfg.train.output_dir) / run_name
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        setup_logging(self.run_dir, info.rank)
        self.ckpt_dir = self.run_dir / "checkpoints"

        self.task = make_task(cfg)
        # The same initialisation on every rank: DeepSpeed broadcasts only what it owns, and a random
        # (weights-file-less) frozen tower must be the same model on every rank too.
        with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
            torch.manual_seed(cfg.train.seed)
            self.model = self.task.build_model(info)
        if cfg.model.shard_backbone:
            from s4v.train.backbone_shard import shard_frozen_tower

            shard_frozen_tower(self.model.backbone, info.device)
        d = cfg.data
        self.train_loader = build_loader(d, d.train_split, train=True, rank=info.rank,
                                         world_size=info.world_size, epoch=0, device=info.device.type)
        self.steps_per_epoch = len(self.train_loader) // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.train_loader)} batches per rank, fewer than "
                             f"train.grad_accum={cfg.train.grad_accum}; use more data or smaller batches")
        total = cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        ds_config = experiment_ds_config(cfg, self.train_loader.clips_per_batch, cfg.train.grad_accum,
                                         info.world_size, info.device.type)
        self.engine, self.optimizer, self.scheduler = self.task.initialize(
            self, ds_config, warmup_cosine(total, warmup, cfg.optim.min_lr_ratio,
                                           global_progress=cfg.optim.schedule == "cosine_global"))
        if info.is_main:
            write_run_description(self.run_dir, cfg, ds_config, argv)
        self.logger = MetricLogger(self.run_dir, enabled=info.is_main)
        self.epoch, self.step, self.best_top1 = 0, 0, float("nan")
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.samples_seen = 0  # training samples delivered by this process (for the skip check)
        self.preempt = PreemptionFlag()

    # ----------------------------------------------------------------------------------------- steps
    def check_skipped(self, batch: dict) -> None:
        """Counted skips are fine; a loader that drops a large share of the data is not (a codec the
        decoder cannot read, a broken mount): stop with the reasons instead of training on nothing."""
        valid = batch.get("valid")
        views = self.cfg.data.repeated_aug  # a training batch holds each sample's views side by side
        self.samples_seen += (int(valid.sum()) if valid is not None else len(batch.get("key", ()))) // views
        skipped = self.train_loader.skipped
        limit = self.cfg.train.max_skip_fraction
        if skipped >= 16 and skipped > limit * (self.samples_seen + skipped):
            reasons = getattr(self.train_loader, "skipped_keys", [])[:5]
            raise DataSkipError(
                f"{skipped} of {self.samples_seen + skipped} training samples could not be read "
                f"(more than train.max_skip_fraction={limit}); first reasons: {reasons}")

    def train_step(self, batch: dict) -> Optional[float]:
        """One micro-batch: forward, loss, backward, (boundary) optimizer step. None if skipped."""
        self.check_skipped(batch)
        loss = self.task.loss(self, batch)
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
        try:
            tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, rank_state,
                                  self.cfg.train.keep_checkpoints)
        except OSError as err:  # full disk, quota, permissions: keep the last good checkpoint
            previous = checkpoint.latest_tag(self.ckpt_dir)
            raise checkpoint.CheckpointError(
                f"could not write checkpoint {checkpoint.tag_for(self.step)} in {self.ckpt_dir}: {err}. "
                f"The previous checkpoint ({previous or 'none'}) is intact; free space and resume.") from err
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
        """Evaluate on `data.val_split` (all views, or one centre view) and log; the task's report."""
        return self.task.evaluate(self, full_views)

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
                    report = self.evaluate(full_views=cfg.eval.during_training_views == "full")
                    self.best_top1 = max(report[self.task.metric],  # top1, or T2V R@1 for retrieval
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
            result.update(self.task.result_fields(report))
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
        """The trained model without the frozen tower (fp32 master weights), for release; rank 0 writes
        `model_side_head.pt`. Loading it needs the tower's weights file too (unless the tower was random)."""
        return self.task.export(self)


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def train(cfg: ExperimentConfig, argv: Optional[list[str]] = None) -> dict:
    trainer = Trainer(cfg, argv or [])
    return trainer.fit()
