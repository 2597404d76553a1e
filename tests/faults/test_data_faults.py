"""Broken data in the input pipeline (both engines): corrupt and truncated mp4 inside a shard, a
truncated tar, an empty shard, a shard that is not a tar, a label outside the class range, a video
shorter than the clip, a missing shard file. Policy (docs/reliability.md): a broken *sample* is
skipped and counted with its reason (and the trainer stops if too many are); a video shorter than the
clip repeats its last frame; a missing *shard file* is an error at start that lists the files. Never a
hang, never a wrong label."""
import collections
import os

import pytest

from s4v.data.config import DataConfig
from s4v.data.loader import build_loader
from tests._video_fixtures import Spec, write_split

pytestmark = pytest.mark.timeout(90)
ENGINES = ["pyav", "dali"]
GOOD = {"a0": 1, "a2": 3, "short": 2, "b1": 5, "d0": 0}
BROKEN = {"a1": "decode failed", "b0": "decode failed", "bad_label": "label 9 outside [0, 6)",
          "neg_label": "label -1 outside [0, 6)", "d1": "truncated member d1.mp4",
          "train-000003.tar#2": "missing from train-000003.tar",  # d2, behind the cut of the tar
          "train-000004.tar#0": "missing from", "train-000004.tar#1": "missing from"}


@pytest.fixture(scope="module")
def bad_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_split")
    S = lambda key, frames, label, **kw: Spec(key, frames, label, height=32, width=32, codec="vp9", **kw)  # noqa: E731
    shards = [
        [S("a0", 12, 1), S("a1", 12, 2, corrupt="garbage"), S("a2", 12, 3), S("short", 2, 2)],
        [S("b0", 12, 4, corrupt="truncate"), S("b1", 12, 5), S("bad_label", 12, 9), S("neg_label", 12, -1)],
        [],  # an empty shard (an empty tar, 0 samples in the index)
        [S("d0", 12, 0), S("d1", 12, 1), S("d2", 12, 4)],  # cut in the middle of d1's video (below)
        [S("e0", 12, 0), S("e1", 12, 1)],  # overwritten with bytes that are not a tar (below)
    ]
    write_split(root, "train", shards, truncate_shard=(3, "d1"))
    (root / "train-000004.tar").write_bytes(os.urandom(3000))
    return root


def _cfg(root, engine, **kw) -> DataConfig:
    base = dict(root=str(root), loader=engine, device="cpu", num_frames=4, image_size=32, resize_short=32,
                batch_size=2, num_workers=1, min_shards_per_reader=0, grayscale_prob=0.0, num_classes=6)
    base.update(kw)
    return DataConfig(**base)


def _read_all(loader):
    got = []
    for b in loader:
        assert b["video"].shape[-4:] == (4, 3, 32, 32)
        for k, lab, ok in zip(b["key"], b["label"].tolist(), b["valid"].tolist()):
            if ok:
                got.append((k, lab))
    return got


@pytest.mark.parametrize("engine", ENGINES)
def test_broken_samples_skipped_and_counted_with_reasons(bad_split, engine):
    loader = build_loader(_cfg(bad_split, engine), "train", train=False)
    got = _read_all(loader)
    keys = collections.Counter(k for k, _ in got)
    assert dict(got) == GOOD and set(keys.values()) == {1}  # each good sample once, with its own label
    reasons = dict(loader.skipped_keys)
    assert loader.skipped == len(loader.skipped_keys) == len(reasons)
    assert set(reasons) == set(BROKEN), reasons
    for key, why in BROKEN.items():
        if engine == "pyav" or "decode" not in why:  # DALI words decoder errors its own way
            assert why in reasons[key], (key, reasons[key])


def test_out_of_range_label_delivered_only_without_a_class_count(bad_split):
    """The range check is opt-in for the data layer (retrieval has no classes); the trainer sets
    data.num_classes = model.num_classes for recognition (s4v.train.preflight.with_label_range)."""
    loader = build_loader(_cfg(bad_split, "pyav", num_classes=None), "train", train=False)
    got = dict(_read_all(loader))
    assert got["bad_label"] == 9 and got["neg_label"] == -1
    from s4v.experiment import ExperimentConfig
    from s4v.train.preflight import with_label_range

    cfg = ExperimentConfig()
    cfg.model.num_classes = 6
    assert with_label_range(cfg).data.num_classes == 6
    cfg = ExperimentConfig(task="retrieval")
    assert with_label_range(cfg).data.num_classes is None


@pytest.mark.parametrize("engine", ENGINES)
def test_video_shorter_than_clip_repeats_last_frame(bad_split, engine):
    import numpy as np

    from tests._video_fixtures import decoded_indices

    cfg = _cfg(bad_split, engine)
    for b in build_loader(cfg, "train", train=False):
        for j, k in enumerate(b["key"]):
            if k == "short" and b["valid"][j]:
                idx = decoded_indices(b["video"][j, 0], cfg)
                assert set(np.unique(idx)) <= {0, 1} and idx[-1] == 1  # 2 frames, edge padded
                return
    pytest.fail("the short video was not delivered")


def test_training_order_skips_too(bad_split):
    """Train mode (shuffled, two ranks): never a broken sample, never a sample twice."""
    seen = []
    for rank in (0, 1):
        loader = build_loader(_cfg(bad_split, "pyav"), "train", train=True, rank=rank, world_size=2, epoch=1)
        seen += [k for k, _ in _read_all(loader)]
        assert {k for k, _ in loader.skipped_keys} <= set(BROKEN)
    assert len(seen) == len(set(seen)) and set(seen) <= set(GOOD)


def test_missing_shard_is_an_error_at_start(bad_split, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for p in bad_split.iterdir():
        if p.name not in ("train-000001.tar", "train-000003.tar"):
            (root / p.name).symlink_to(p)
    with pytest.raises(FileNotFoundError, match=r"2 of 5 shards .* missing: train-000001.tar, train-000003.tar"):
        build_loader(_cfg(root, "pyav"), "train", train=True)


def test_missing_index_is_an_error_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard index .*train-index.json"):
        build_loader(_cfg(tmp_path, "pyav"), "train", train=True)


def _check(trainer, batch):
    """What Trainer.train_step does with each micro-batch and, through the step's flags, at its end."""
    from s4v.train.dist import DistInfo

    trainer.info = DistInfo()
    trainer.count_samples(batch)
    if trainer.too_many_skipped():
        raise trainer.skip_error()


def test_too_many_skips_stop_training_with_reasons():
    """Counted skips are fine up to train.max_skip_fraction, then DataSkipError (Trainer.too_many_skipped)."""
    import torch

    from s4v.experiment import ExperimentConfig
    from s4v.train.loop import DataSkipError, Trainer

    class FakeLoader:
        skipped, skipped_keys = 0, []

    t = Trainer.__new__(Trainer)
    t.cfg, t.samples_seen, t.train_loader = ExperimentConfig(), 0, FakeLoader()
    batch = {"valid": torch.ones(8, dtype=torch.bool)}
    for _ in range(50):  # 400 good samples
        _check(t, batch)
    t.train_loader.skipped, t.train_loader.skipped_keys = 20, [("x", "decode failed: Invalid data")] * 20
    _check(t, batch)  # 20 of 428 < 5 %
    t.train_loader.skipped = 40
    with pytest.raises(DataSkipError, match=r"40 of .* could not be read .*decode failed"):
        _check(t, batch)


def test_skip_fraction_counts_samples_not_repeated_views():
    """With data.repeated_aug=2 a batch of 8 views holds 4 samples: 20 skips in 224 (8.9 %) stop
    training, where counting views (20 in 428, 4.7 %) would not."""
    import dataclasses

    import torch

    from s4v.experiment import ExperimentConfig
    from s4v.train.loop import DataSkipError, Trainer

    class FakeLoader:
        skipped, skipped_keys = 0, []

    t = Trainer.__new__(Trainer)
    cfg = ExperimentConfig()
    t.cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, repeated_aug=2))
    t.samples_seen, t.train_loader = 0, FakeLoader()
    batch = {"valid": torch.ones(8, dtype=torch.bool)}
    for _ in range(50):
        _check(t, batch)
    assert t.samples_seen == 200
    t.train_loader.skipped, t.train_loader.skipped_keys = 20, [("x", "decode failed")] * 20
    with pytest.raises(DataSkipError, match=r"20 of 224 training samples"):
        _check(t, batch)
