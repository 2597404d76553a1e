"""Non-finite losses and fp16 overflows at the level of Trainer.train_step with a fake engine (no
DeepSpeed): a NaN or inf loss is skipped (no backward, no optimizer step) and counted; K in a row
stop with NonFiniteLossError; a finite loss resets the run; DeepSpeed's fp16 overflow skips
(`engine.skipped_steps`) are logged as train/overflow_steps. The fp16 path itself needs a GPU."""
import math

import pytest
import torch

from s4v.experiment import ExperimentConfig
from s4v.train.loop import NonFiniteLossError, Trainer

pytestmark = pytest.mark.timeout(60)


class FakeEngine:
    def __init__(self):
        self.backwards = self.steps = 0
        self.skipped_steps = 0  # DeepSpeed's count of fp16 overflow steps

    def backward(self, loss):
        self.backwards += 1

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return 0.5


class FakeTask:
    def __init__(self, values):
        self.values = iter(values)

    def loss(self, trainer, batch):
        return torch.tensor(next(self.values))


class FakeLoader:
    skipped, skipped_keys = 0, []


def _trainer(values, k=3):
    t = Trainer.__new__(Trainer)
    t.cfg = ExperimentConfig()
    t.cfg.train.max_nonfinite_steps = k
    t.engine, t.task, t.train_loader = FakeEngine(), FakeTask(values), FakeLoader()
    t.step, t.samples_seen, t.nonfinite_in_a_row, t.nonfinite_total = 0, 0, 0, 0
    t.ckpt_dir = "runs/x/checkpoints"
    return t


BATCH = {"key": ["a", "b"], "valid": torch.ones(2, dtype=torch.bool)}


def test_nonfinite_losses_skipped_and_counted():
    t = _trainer([1.0, math.nan, math.inf, 2.0, -math.inf, 3.0])
    out = [t.train_step(BATCH) for _ in range(6)]
    assert out == [1.0, None, None, 2.0, None, 3.0]
    assert t.engine.backwards == t.engine.steps == 3  # skipped steps never touch the weights
    assert t.nonfinite_total == 3 and t.nonfinite_in_a_row == 0


def test_k_in_a_row_stop_with_a_clear_message():
    t = _trainer([1.0, math.nan, math.nan, math.nan, 1.0], k=3)
    t.train_step(BATCH), t.train_step(BATCH), t.train_step(BATCH)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite losses .*last good checkpoint is in runs/x"):
        t.train_step(BATCH)
    assert t.engine.steps == 1


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

    from s4v.train.dist import DistInfo
    from s4v.train.metrics import Meter

    t.logger, t.scheduler, t.info, t.epoch = Logger(), Sched(), DistInfo(), 0
    m = Meter()
    m.update(1.0)
    t.log_train(m, m, m, clips=2)
    assert logged["train/overflow_steps"] == 7 and logged["train/nonfinite_steps"] == 0


def test_resume_with_other_world_size_is_refused():
    from s4v.train import checkpoint

    class Eng:
        world_size, global_rank = 3, 0

        def load_checkpoint(self, d, tag, load_module_strict):
            return d, {"rank_states": [{}, {}]}

    with pytest.raises(RuntimeError, match="written by 2 ranks, this job has 3"):
        checkpoint.load(Eng(), __import__("pathlib").Path("."), tag="step_00000001")
