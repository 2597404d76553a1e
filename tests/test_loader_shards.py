"""Shard assignment and epoch plans (pure Python): coverage, uneven policy, worker split, position."""
import numpy as np
import pytest

from s4v.data.shards import (PAD, LoaderPosition, ShardTable, batches_per_epoch, check_shard_count, epoch_batches,
                             worker_batches)

TABLE = ShardTable(tuple(f"t-{i:06d}.tar" for i in range(7)), (10, 7, 13, 9, 10, 4, 11))  # N = 64


def plan(rank, world, bs, train, epoch=0, seed=0, window=8):
    return epoch_batches(TABLE, seed, epoch, world, rank, bs, train, window)


@pytest.mark.parametrize("world,bs", [(1, 5), (2, 3), (3, 4), (4, 7)])
def test_eval_pads_and_covers_exactly_once(world, bs):
    plans = [plan(r, world, bs, train=False) for r in range(world)]
    assert len({p.shape for p in plans}) == 1  # same number of batches on every rank
    ids = np.concatenate([p.reshape(-1) for p in plans])
    real = ids[ids != PAD]
    assert sorted(real.tolist()) == list(range(TABLE.num_samples))
    assert len(plans[0]) == batches_per_epoch(TABLE.num_samples, world, bs, train=False)


@pytest.mark.parametrize("world,bs", [(1, 5), (2, 3), (3, 4), (4, 7)])
def test_train_drops_tail_equal_batches(world, bs):
    plans = [plan(r, world, bs, train=True, epoch=3) for r in range(world)]
    assert len({p.shape for p in plans}) == 1
    ids = np.concatenate([p.reshape(-1) for p in plans])
    assert len(set(ids.tolist())) == len(ids) and PAD not in ids  # never twice
    assert TABLE.num_samples - len(ids) < world * bs  # dropped less than one global batch
    assert len(plans[0]) == (TABLE.num_samples // world) // bs


def test_train_shuffles_per_epoch_deterministically():
    a, b, c = plan(0, 2, 4, True, epoch=0), plan(0, 2, 4, True, epoch=0), plan(0, 2, 4, True, epoch=1)
    assert (a == b).all() and not (a == c).all()
    assert not (plan(0, 2, 4, True, seed=1) == a).all()
    # the dropped samples differ between epochs
    full = set(range(TABLE.num_samples))
    dropped = [full - set(np.concatenate([plan(r, 2, 5, True, epoch=e).reshape(-1) for r in range(2)]).tolist())
               for e in range(4)]
    assert len({frozenset(d) for d in dropped}) > 1


def test_worker_split_is_partition_in_order():
    for start in (0, 3):
        parts = [list(worker_batches(11, start, w, 3)) for w in range(3)]
        merged = sorted(b for p in parts for b in p)
        assert merged == list(range(start, 11))
        # torch DataLoader collects round-robin: worker0, worker1, worker2, worker0, ...
        rr = [p[i] for i in range(4) for p in parts if i < len(p)]
        assert rr == list(range(start, 11))


def test_locate():
    assert TABLE.locate(0) == (0, 0) and TABLE.locate(9) == (0, 9) and TABLE.locate(10) == (1, 0)
    assert TABLE.locate(63) == (6, 10)


def test_shard_count_check():
    check_shard_count(8, 2, 4)
    with pytest.raises(ValueError, match="need at least 16"):
        check_shard_count(8, 2, 8)
    check_shard_count(1, 4, 4, min_per_reader=0)


def test_position_compatibility():
    p = LoaderPosition(epoch=2, batch=5, seed=1, world_size=2, rank=0, batch_size=4, num_samples=64, shards=("a",))
    p.check_compatible(p.state_dict())
    bad = {**p.state_dict(), "world_size": 4}
    with pytest.raises(ValueError, match="world_size"):
        p.check_compatible(bad)
