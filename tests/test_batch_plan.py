"""The global batch (train.global_batch_size -> accumulation) and the elastic data plan: an epoch
interrupted on N ranks and continued on M ranks trains every sample of the epoch exactly once."""
import numpy as np
import pytest

from s4v.data.shards import ShardTable, deal, elastic_epoch_batches, epoch_batches, untrained_after
from s4v.train.batching import BatchPlanError, plan_batches, working_micro_batches


def test_global_batch_derives_the_accumulation():
    plan = plan_batches(micro_batch=4, world_size=2, global_batch=32)
    assert (plan.grad_accum, plan.global_batch) == (4, 32)
    assert plan_batches(4, 8, 32).grad_accum == 1
    assert plan_batches(4, 2).grad_accum == 1 and plan_batches(4, 2, grad_accum=3).global_batch == 24
    assert "32 samples = 4 per micro-batch x 4 accumulation x 2 ranks" in plan.describe()


def test_indivisible_global_batch_lists_the_micro_batches_that_work():
    with pytest.raises(BatchPlanError, match=r"not a multiple of data.batch_size=5 x 2 ranks.*1, 2, 4, 8, 16"):
        plan_batches(5, 2, 32)
    with pytest.raises(BatchPlanError, match="3 ranks do not divide it"):
        plan_batches(2, 3, 32)
    assert working_micro_batches(256, 8) == [1, 2, 4, 8, 16, 32]


def test_grad_accum_and_global_batch_must_agree():
    assert plan_batches(4, 2, 32, grad_accum=4).grad_accum == 4
    with pytest.raises(BatchPlanError, match="train.grad_accum=2 but .* needs 4; set only one"):
        plan_batches(4, 2, 32, grad_accum=2)
    with pytest.raises(BatchPlanError, match="grad_accum must be >= 1"):
        plan_batches(4, 2, grad_accum=0)


TABLE = ShardTable(tuple(f"s{i}.tar" for i in range(6)), (8, 8, 8, 8, 8, 8))  # 48 samples


def _trained(plans, done):
    return [int(i) for plan, d in zip(plans, done) for batch in plan[:d] for i in batch]


@pytest.mark.parametrize("before,after", [((2, 2), (1, 4)), ((1, 4), (2, 2)), ((2, 2), (4, 1)), ((4, 1), (2, 2))])
def test_elastic_epoch_trains_every_sample_once(before, after):
    """(world size, batch size) before -> after, the same global batch of 4 per micro-step-group."""
    (w0, b0), (w1, b1) = before, after
    plans0 = [epoch_batches(TABLE, 7, 3, w0, r, b0, True, 8) for r in range(w0)]
    done = [len(p) // 3 for p in plans0]  # a third of the epoch trained
    seg = [{"world_size": w0, "batch_size": b0, "done": done}]
    plans1 = [elastic_epoch_batches(TABLE, 7, 3, w1, r, b1, 8, seg) for r in range(w1)]
    seen = _trained(plans0, done) + _trained(plans1, [len(p) for p in plans1])
    assert sorted(seen) == list(range(48))
    # a second change of world size in the same epoch
    done1 = [len(p) // 2 for p in plans1]
    seg2 = seg + [{"world_size": w1, "batch_size": b1, "done": done1}]
    plans2 = [elastic_epoch_batches(TABLE, 7, 3, w0, r, b0, 8, seg2) for r in range(w0)]
    seen2 = _trained(plans0, done) + _trained(plans1, done1) + _trained(plans2, [len(p) for p in plans2])
    assert sorted(seen2) == list(range(48))


def test_elastic_plan_without_segments_is_the_normal_plan_and_deal_is_even():
    np.testing.assert_array_equal(elastic_epoch_batches(TABLE, 1, 0, 2, 1, 4, 8, ()),
                                  epoch_batches(TABLE, 1, 0, 2, 1, 4, True, 8))
    parts = [deal(np.arange(10), 3, r, 2) for r in range(3)]
    assert [p.shape for p in parts] == [(1, 2)] * 3  # 10 over 3 ranks: 3 each, one whole batch of 2
    assert len(untrained_after(TABLE, 1, 0, 8, [{"world_size": 2, "batch_size": 4, "done": [0, 0]}])) == 48


def test_preflight_refuses_an_indivisible_global_batch(tmp_path):
    """At start-up, before any model or data work: the error names the key and the batch sizes that work."""
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment
    from s4v.train.preflight import preflight
    from tests._train_fixtures import tiny_overrides, write_tiny_shards

    root = write_tiny_shards(tmp_path / "shards")
    cfg = load_experiment(None, tiny_overrides(root, tmp_path, "run", **{"train.global_batch_size": 12}))
    preflight(cfg, world_size=2)  # 12 = 2 x 3 x 2
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not a multiple .* work on 4 ranks: 1, 3"):
        preflight(cfg, world_size=4)
    cfg.train.grad_accum = 2
    with pytest.raises(ConfigError, match=r"train.grad_accum=2 but .* needs 3"):
        preflight(cfg, world_size=2)


def test_retrieval_refuses_accumulation(tmp_path):
    """The contrastive loss takes its negatives from one step's batch, so accumulating micro-batches would
    train another loss: refused at start with the per-GPU batch that holds the global batch."""
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment
    from s4v.train.preflight import preflight
    from tests._train_fixtures import tiny_overrides, write_tiny_shards

    root = write_tiny_shards(tmp_path / "shards")
    extra = {"task": "retrieval", "model.name": "s4v_retrieval_tiny", "model.num_classes": "auto",
             "train.global_batch_size": 8}
    cfg = load_experiment(None, tiny_overrides(root, tmp_path, "run", **extra))
    with pytest.raises(ConfigError, match=r"retrieval does not accumulate .* set data.batch_size=4 so that 2 ranks"):
        preflight(cfg, world_size=2)
