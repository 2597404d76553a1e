"""`train(cfg)`: the whole training run, top to bottom, and `train_step`.

The frozen backbone runs outside the DeepSpeed engine under no_grad; the engine owns the side network
and head (recognition) or the side network, heads and text tower (retrieval). What differs between the
tasks (model, engine module, parameter groups, loss, evaluation, export) is in `s4v.train.tasks`.
Checkpoints hold the exact data position and RNG states of every rank, so a resumed run continues
exactly where the interrupted one stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from s4v.config import ConfigError
from s4v.data.classes import class_list_difference
from s4v.data.format import SplitIndex
from s4v.data.loader import build_loader
from s4v.experiment import ExperimentConfig
from s4v.train import checkpoint
from s4v.train.dist import (PreemptionFlag, all_reduce_sum_, barrier, broadcast_object, init_distributed,
                            requeue_slurm_job)
from s4v.train.engine import warmup_cosine
from s4v.train.lineage import SampleLineage
from s4v.train.metrics import MetricLogger, memory_stats
from s4v.train.preflight import batch_plan, experiment_ds_config, job_world_size, preflight, with_label_range
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


class StepOutcome(NamedTuple):
    applied: bool  # DeepSpeed updated the weights
    nonfinite: int  # micro-batches of the window with a NaN/inf loss, summed over ranks
    preempt: bool  # some rank got a preemption signal


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
        self.plan = batch_plan(cfg, info.world_size)
        self.steps_per_epoch = len(self.train_loader) // self.plan.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.train_loader)} batches per rank, fewer than the "
                             f"{self.plan.grad_accum} micro-batches of an optimizer step")
        dropped = len(self.train_loader) % self.plan.grad_accum
        log.info("%s; %d optimizer steps per epoch%s", self.plan.describe(), self.steps_per_epoch,
                 f" (the last {dropped} micro-batches of each epoch's {len(self.train_loader)} are left out)"
                 if dropped else "")
        self.max_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        ds_config = experiment_ds_config(cfg, self.train_loader.clips_per_batch, self.plan.grad_accum,
                                         info.world_size, info.device.type)
        self.engine, self.optimizer, self.scheduler = self.task.initialize(
            self, ds_config, warmup_cosine(cfg.train.epochs * self.steps_per_epoch, warmup, cfg.optim.min_lr_ratio,
                                           global_progress=cfg.optim.schedule == "cosine_global"))
        if info.is_main:
            write_run_description(self.run_dir, cfg, ds_config, argv, batch=self.plan)
        self.logger = MetricLogger(self.run_dir, enabled=info.is_main)
        self.lineage = SampleLineage(self.run_dir, info.rank) if cfg.train.log_samples else None
        self.epoch, self.step, self.best_top1 = 0, 0, float("nan")
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.samples_seen = 0  # training samples delivered by this process (for the skip check)
        self.preempt = PreemptionFlag()
        self.saved_state: Optional[tuple] = None  # (epoch, step, data position) of the last checkpoint
        self.loss_sum = torch.zeros((), device=info.device)  # finite micro-batch losses since the last log
        self.loss_count = torch.zeros((), device=info.device)

    # ----------------------------------------------------------------------------------------- steps
    def count_samples(self, batch: dict) -> None:
        valid = batch.get("valid")
        views = self.cfg.data.repeated_aug  # a training batch holds each sample's views side by side
        self.samples_seen += (int(valid.sum()) if valid is not None else len(batch.get("key", ()))) // views

    def too_many_skipped(self) -> bool:
        """Counted skips are fine; a loader that drops a large share of the data is not (a codec the
        decoder cannot read, a broken mount). Decided per rank, acted on by all (the step's flags)."""
        skipped = self.train_loader.skipped
        return skipped >= 16 and skipped > self.cfg.train.max_skip_fraction * (self.samples_seen + skipped)

    def skip_error(self) -> DataSkipError:
        skipped, limit = self.train_loader.skipped, self.cfg.train.max_skip_fraction
        reasons = getattr(self.train_loader, "skipped_keys", [])[:5]
        return DataSkipError(f"{skipped} of {self.samples_seen + skipped} training samples could not be read on "
                             f"rank {self.info.rank} (more than train.max_skip_fraction={limit}); first reasons: "
                             f"{reasons}" if self.too_many_skipped() else
                             f"another rank could not read more than train.max_skip_fraction={limit} of its "
                             f"training samples (its log names them)")

    def micro_step(self, batch: dict, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; DeepSpeed applies the update after the window's last.
        Returns whether the loss was finite, as a device tensor (no host sync)."""
        self.count_samples(batch)
        if self.engine.is_gradient_accumulation_boundary() != last:  # the windows must stay aligned
            raise RuntimeError(f"DeepSpeed's accumulation boundary is out of step with the loop at step {self.step}")
        loss = self.task.loss(self, batch)
        finite = torch.isfinite(loss.detach())
        self.loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        self.loss_count += finite
        # A non-finite loss makes every gradient of the window non-finite, so DeepSpeed's overflow check
        # (the global gradient norm, on every ZeRO stage) skips the whole window's update on every rank.
        self.engine.backward(loss * torch.where(finite, 1.0, math.nan))
        self.engine.step()
        return finite

    def train_step(self, batches: Iterator[dict]) -> StepOutcome:
        """One optimizer step: `grad_accum` micro-batches, then one all-reduce of the step's flags
        (non-finite losses, preemption, unreadable data): the step's only collective outside DeepSpeed's."""
        accum, device = self.plan.grad_accum, self.info.device
        nonfinite = torch.zeros((), device=device)
        window = []
        for micro in range(accum):
            tick = time.perf_counter()
            batch = next(batches)
            self.data_wait += time.perf_counter() - tick
            window.append(batch)
            nonfinite += ~self.micro_step(batch, last=micro == accum - 1)
        local_flags = torch.tensor([0.0, float(self.preempt.local), float(self.too_many_skipped())], device=device)
        local_flags[0] = nonfinite
        nonfinite_all, preempt, skip_stop = all_reduce_sum_(local_flags).tolist()
        applied = bool(self.engine.was_step_applied())
        if self.lineage:
            for micro, batch in enumerate(window):
                self.lineage.write(self.epoch, self.step + 1, micro, batch, applied)
        if skip_stop:
            raise self.skip_error()
        window_keys = [k for batch in window for k in list(batch.get("key", []))[:2]]
        if nonfinite_all and applied:
            raise RuntimeError("DeepSpeed applied an update after a non-finite loss; use a ZeRO config (stage 1-3)")
        if nonfinite_all:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            log.warning("non-finite loss in %d micro-batch(es) before step %d (keys %s); update skipped (%d in a row)",
                        nonfinite_all, self.step + 1, window_keys[:4], self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} consecutive non-finite losses at step {self.step}; stopping. "
                    f"The last good checkpoint is in {self.ckpt_dir} (lower optim.lr, or check the data).")
        elif applied:
            self.nonfinite_in_a_row = 0
        if applied:
            self.step += 1
        return StepOutcome(applied, int(nonfinite_all), preempt > 0)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_key(self) -> tuple:
        pos = self.train_loader.state_dict()
        return self.epoch, self.step, pos["epoch"], pos["batch"]

    def save(self) -> None:
        if self.saved_state == self.state_key():  # this exact state is already on disk
            return
        client = {"epoch": self.epoch, "step": self.step, "best_top1": self.best_top1,
                  "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                  "global_batch": self.plan.global_batch,
                  "ds_optimizer_steps": ds_optimizer_steps(self.engine), "classes": self.train_classes()}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": checkpoint.rng_state(),
                      "loss_since_log": [self.loss_sum.item(), self.loss_count.item()]}
        if self.lineage:
            rank_state["lineage_bytes"] = self.lineage.flush()
            if self.info.is_main:
                client["lineage_bytes_of_former_ranks"] = self.lineage.sizes_from_rank(self.info.world_size)
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, rank_state,
                              self.cfg.train.keep_checkpoints)
        self.saved_state = self.state_key()
        log.info("saved checkpoint %s", self.ckpt_dir / tag)

    def maybe_resume(self) -> None:
        mode = self.cfg.train.resume
        if mode == "none":
            return
        ckpt_dir, tag = (self.ckpt_dir, None) if mode == "auto" else checkpoint.resolve_resume(Path(mode))
        own = ckpt_dir.resolve() == self.ckpt_dir.resolve()  # else another run's: its folder is left as it is
        loaded = checkpoint.load(self.engine, ckpt_dir, tag)
        if loaded is None and mode != "auto":
            raise ConfigError(f"train.resume={mode}: {ckpt_dir} holds no checkpoint yet "
                              "(train.resume=auto starts fresh when there is none)")
        if loaded is None:  # a fresh start: rows and lineage of an attempt that never checkpointed go
            self.logger.rewind(0)
            if self.lineage:
                self.lineage.rewind([])
            return
        client, rank_states = loaded
        self.check_resumable(client)
        self.epoch, self.step = client["epoch"], client["step"]
        self.best_top1 = client.get("best_top1", float("nan"))
        self.nonfinite_total = client.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = client.get("nonfinite_in_a_row", 0)
        if self.info.rank < len(rank_states) and "loss_since_log" in rank_states[self.info.rank]:
            loss_sum, loss_count = rank_states[self.info.rank]["loss_since_log"]
            self.loss_sum.fill_(loss_sum), self.loss_count.fill_(loss_count)
        self.train_loader.resume_from([r["loader"] for r in rank_states])
        if len(rank_states) == self.info.world_size:
            checkpoint.set_rng_state(rank_states[self.info.rank]["rng"])
        else:  # a new world: each rank's RNG starts from the seed, the step and its rank
            seed_everything(self.cfg.train.seed + self.step * 1009 + self.info.rank)
            log.warning("resumed on %d ranks from a checkpoint of %d ranks: the rest of epoch %d is re-dealt "
                        "over the new ranks", self.info.world_size, len(rank_states), self.epoch)
        if self.lineage and own:
            self.lineage.rewind([r.get("lineage_bytes") for r in rank_states],
                                client.get("lineage_bytes_of_former_ranks", {}))
        elif self.lineage:  # this run's lineage starts at the other run's step; that run's rows are in its folder
            self.lineage.rewind([])
        self.logger.rewind(self.step)
        if self.info.is_main:  # later checkpoints of this run belong to an abandoned continuation
            checkpoint.set_aside_newer(self.ckpt_dir, self.step)
        barrier()
        self.saved_state = self.state_key()
        log.info("resumed from %s at epoch %d, step %d", ckpt_dir, self.epoch, self.step)

    def check_resumable(self, client: dict) -> None:
        """A checkpoint continues the same optimisation on the same labels, or the run stops (rc 2)."""
        saved_global = client.get("global_batch")
        if saved_global is not None and saved_global != self.plan.global_batch:
            raise ConfigError(f"the checkpoint was trained with a global batch of {saved_global} samples, this run "
                              f"gives {self.plan.global_batch} ({self.plan.describe()}); set "
                              f"train.global_batch_size={saved_global} to continue the same optimisation")
        saved_classes, classes = client.get("classes"), self.train_classes()
        diff = saved_classes and classes and class_list_difference(saved_classes, classes)
        if diff:
            raise ConfigError(f"the checkpoint was trained on another class list than split "
                              f"{self.cfg.data.train_split!r} under {self.cfg.data.root}: {diff}")

    def train_classes(self) -> list[str]:
        return list(SplitIndex.load(self.cfg.data.root, self.cfg.data.train_split).classes or [])

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, full_views: bool) -> dict:
        """Evaluate on `data.val_split` (all views, or one centre view) and log; the task's report."""
        return self.task.evaluate(self, full_views)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        status = "finished"
        while self.epoch < cfg.train.epochs and self.step < self.max_steps:
            status = self.train_epoch()
            if status != "epoch_end":
                break
            self.epoch += 1
            self.train_loader.set_epoch(self.epoch)
            if cfg.eval.every_epochs and self.epoch % cfg.eval.every_epochs == 0:
                report = self.evaluate(full_views=cfg.eval.during_training_views == "full")
                self.best_top1 = max(report[self.task.metric],  # top1, or T2V R@1 for retrieval
                                     self.best_top1 if not math.isnan(self.best_top1) else -1.0)
            self.save()
        status = "preempted" if status == "preempted" else "finished"
        self.save()
        result = {"status": status, "epoch": self.epoch, "step": self.step, "run_dir": str(self.run_dir),
                  "skipped_samples": self.train_loader.skipped, "nonfinite_steps": self.nonfinite_total,
                  "ds_optimizer_steps": ds_optimizer_steps(self.engine), **dataclasses.asdict(self.plan)}
        if status == "preempted":
            if self.info.is_main:
                requeue_slurm_job()
            return result
        if cfg.eval.at_end:
            report = self.evaluate(full_views=True)
            result.update(self.task.result_fields(report))
        if cfg.train.export:
            self.export()
        self.logger.flush()
        return result

    def train_epoch(self) -> str:
        """The optimizer steps left in this epoch. Returns "epoch_end", "preempted" or "max_steps"."""
        cfg, loader, accum = self.cfg, self.train_loader, self.plan.grad_accum
        loader.set_epoch(self.epoch)  # keeps a restored mid-epoch position
        steps_left = (loader.batches_in_epoch - loader.batches_done) // accum
        bar = tqdm(total=loader.batches_in_epoch // accum, initial=loader.batches_done // accum,
                   desc=f"epoch {self.epoch}", disable=not self.info.is_main, dynamic_ncols=True)
        batches = iter(loader)
        self.data_wait, tick, steps_timed = 0.0, time.perf_counter(), 0
        try:
            for _ in range(steps_left):
                outcome = self.train_step(batches)
                steps_timed += 1
                bar.update(1)
                if outcome.applied and self.step % cfg.train.log_every_steps == 0:
                    self.log_train(time.perf_counter() - tick, steps_timed)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}")
                    self.data_wait, tick, steps_timed = 0.0, time.perf_counter(), 0
                if outcome.applied and cfg.train.ckpt_every_steps and self.step % cfg.train.ckpt_every_steps == 0:
                    self.save()
                if outcome.preempt:
                    self.save()
                    return "preempted"
                if self.step >= self.max_steps:  # the epoch's last step also ends the epoch
                    return "epoch_end" if loader.batches_done + accum > loader.batches_in_epoch else "max_steps"
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close:
                close()  # an epoch left before its end (or its leftover micro-batches) stops its readers
        return "epoch_end"

    def log_train(self, elapsed: float, steps: int) -> None:
        """Log the steps since the last log: the mean loss (the one host read of it), timings, counters."""
        self.last_loss = (self.loss_sum / self.loss_count.clamp_min(1)).item() if self.loss_count.item() else math.nan
        self.loss_sum.zero_(), self.loss_count.zero_()
        clips = self.train_loader.clips_per_batch * self.plan.grad_accum * self.info.world_size * steps
        values = {"train/loss": self.last_loss, "train/lr": self.scheduler.get_last_lr()[0],
                  "train/grad_norm": _grad_norm(self.engine), "perf/data_wait_s": self.data_wait / steps,
                  "perf/step_s": elapsed / steps, "perf/clips_per_s": clips / elapsed if elapsed else None,
                  "train/skipped_samples": self.train_loader.skipped,
                  "train/nonfinite_steps": self.nonfinite_total, "train/epoch": self.epoch}
        if getattr(self.engine, "skipped_steps", None) is not None:
            values["train/overflow_steps"] = self.engine.skipped_steps - self.nonfinite_total
        values.update(memory_stats(self.info.device))
        self.logger.log(self.step, values)

    def export(self) -> Optional[Path]:
        """The trained model without the frozen tower (fp32 master weights), for release; rank 0 writes
        `model_side_head.pt`. Loading it needs the tower's weights file too (unless the tower was random)."""
        return self.task.export(self)


def ds_optimizer_steps(engine) -> Optional[int]:
    """Updates DeepSpeed applied: its step count less the steps it skipped (overflow, non-finite)."""
    if not hasattr(engine, "global_steps"):
        return None
    return int(engine.global_steps) - int(getattr(engine, "skipped_steps", 0) or 0)


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def train(cfg: ExperimentConfig, argv: Optional[list[str]] = None) -> dict:
    trainer = Trainer(cfg, argv or [])
    return trainer.fit()
