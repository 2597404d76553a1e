"""Non-finite losses and fp16 overflows at the level of Trainer.train_step (one optimizer step over a
window of micro-batches) with a fake engine that behaves like DeepSpeed's ZeRO optimizers (no DeepSpeed):
a NaN or inf loss in any micro-batch skips the whole window's update and is counted; the step counter
counts updates; K skipped windows in a row stop with NonFiniteLossError; an applied update resets the
run; one all-reduce per optimizer step; DeepSpeed's fp16 overflow skips are logged as
train/overflow_steps. The fp16 path itself needs a GPU."""
import math

import pytest
import torch

from s4v.experiment import ExperimentConfig
from s4v.train.batching import plan_batches
from s4v.train.dist import DistInfo
from s4v.train.loop import NonFiniteLossError, Trainer

pytestmark = pytest.mark.timeout(60)


class FakeEngine:
    """DeepSpeed's managed accumulation: step() applies the update at the window's last micro-batch,
    unless the window's gradients are non-finite (ZeRO's overflow check), which it counts as skipped."""

    def __init__(self, accum=1):
        self.accum, self.micro = accum, 0
        self.backwards = self.updates = self.skipped_steps = self.global_steps = 0
        self.window_finite, self.applied = True, False

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accum == 0

    def backward(self, loss):
        self.backwards += 1
        self.window_finite &= bool(torch.isfinite(loss))

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.applied = self.window_finite
            self.updates += self.applied
            self.skipped_steps += not self.applied
            self.global_steps += 1
            self.window_finite = True
        self.micro += 1

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return 0.5


class FakeTask:
    def __init__(self, values):
        self.values = iter(values)

    def loss(self, trainer, batch):
        return torch.tensor(next(self.values))


class FakeLoader:
    skipped, skipped_keys = 0, []


class FakePreempt:
    local = False


def _trainer(values, k=3, accum=1):
    t = Trainer.__new__(Trainer)
    t.cfg = ExperimentConfig()
    t.cfg.train.max_nonfinite_steps = k
    t.engine, t.task, t.train_loader = FakeEngine(accum), FakeTask(values), FakeLoader()
    t.plan, t.info, t.preempt, t.lineage = plan_batches(2, 1, grad_accum=accum), DistInfo(), FakePreempt(), None
    t.step, t.epoch, t.samples_seen, t.nonfinite_in_a_row, t.nonfinite_total, t.data_wait = 0, 0, 0, 0, 0, 0.0
    t.loss_sum, t.loss_count = torch.zeros(()), torch.zeros(())
    t.ckpt_dir = "runs/x/checkpoints"
    return t


BATCH = {"key": ["a", "b"], "valid": torch.ones(2, dtype=torch.bool)}


def batches():
    while True:
        yield BATCH


def test_nonfinite_losses_skipped_and_counted():
    t = _trainer([1.0, math.nan, math.inf, 2.0, -math.inf, 3.0])
    out = [t.train_step(batches()) for _ in range(6)]
    assert [o.applied for o in out] == [True, False, False, True, False, True]
    assert t.engine.updates == t.step == 3  # skipped steps never touch the weights, nor the step counter
    assert t.nonfinite_total == 3 and t.nonfinite_in_a_row == 0
    assert t.loss_sum.item() == 6.0 and t.loss_count.item() == 3  # the logged mean is over finite losses


def test_accumulation_counts_optimizer_updates_and_skips_whole_windows():
    """grad_accum=3: a step is counted after the window's third micro-batch, not its first; a NaN in the
    middle micro-batch skips the whole window (the other two micro-batches' gradients included)."""
    t = _trainer([1.0, 2.0, 3.0, 4.0, math.nan, 6.0, 7.0, 8.0, 9.0], accum=3)
    first = t.train_step(batches())
    assert first.applied and t.step == 1 and t.engine.backwards == 3 and t.engine.micro == 3
    second = t.train_step(batches())
    assert not second.applied and second.nonfinite == 1 and t.step == 1 and t.nonfinite_total == 1
    third = t.train_step(batches())
    assert third.applied and t.step == 2 and t.engine.updates == 2
    assert t.engine.global_steps - t.engine.skipped_steps == t.step


def test_misaligned_accumulation_window_is_an_error():
    t = _trainer([1.0, 2.0, 3.0], accum=2)
    t.engine.micro = 1  # DeepSpeed one micro-batch ahead of the loop (the old bug's resume shift)
    with pytest.raises(RuntimeError, match="out of step"):
        t.train_step(batches())


def test_one_collective_per_optimizer_step(monkeypatch):
    import s4v.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "all_reduce_sum_", lambda flags: calls.append(flags.clone()) or flags)
    t = _trainer([1.0] * 8, accum=4)
    t.train_step(batches()), t.train_step(batches())
    assert len(calls) == 2 and calls[0].tolist() == [0.0, 0.0, 0.0]  # non-finite, preempt, unreadable


def test_k_in_a_row_stop_with_a_clear_message():
    t = _trainer([1.0, math.nan, math.nan, math.nan, 1.0], k=3)
    t.train_step(batches()), t.train_step(batches()), t.train_step(batches())
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite losses .*last good checkpoint is in runs/x"):
        t.train_step(batches())
    assert t.engine.updates == 1


def test_fp16_overflow_steps_are_logged():
    t = _trainer([])
    t.engine.skipped_steps = 7
    logged = {}

    class Logger:
        def log(self, step, values):
            logged.update(values)

    class Sched:
        def get_last_lr(self):
            return [1e-3]

    t.logger, t.scheduler = Logger(), Sched()
    t.train_loader.clips_per_batch = 2
    t.log_train(elapsed=1.0, steps=1)
    assert logged["train/overflow_steps"] == 7 and logged["train/nonfinite_steps"] == 0


def test_too_many_unreadable_samples_on_another_rank_stop_every_rank(monkeypatch):
    """A rank whose loader skips too much raises DataSkipError only through the step's flags, so every
    rank stops at the same step instead of one rank leaving the others in a collective."""
    import s4v.train.loop as loop
    from s4v.train.loop import DataSkipError

    def other_rank_gave_up(flags):
        flags[2] += 1
        return flags

    monkeypatch.setattr(loop, "all_reduce_sum_", other_rank_gave_up)
    t = _trainer([1.0, 2.0])
    with pytest.raises(DataSkipError, match="another rank could not read"):
        t.train_step(batches())
