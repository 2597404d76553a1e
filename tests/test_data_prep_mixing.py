"""Class-sorted sources (issue 13, item 6): data_prep shuffles every split, so that the training
loader's batches cover the classes as a uniform random draw would.

8 classes x 64 tiny clips in class folders, batches of 16 read through the loader's epoch plan
(`s4v.data.shards.epoch_batches`, world size 1). Labels per global id come from the tars' `.cls`
members (no video decoding).
"""
from __future__ import annotations

import tarfile
from math import comb
from pathlib import Path

import numpy as np
import pytest

from data_prep import shard
from s4v.data.config import DataConfig
from s4v.data.format import SplitIndex
from s4v.data.shards import ShardTable, epoch_batches

from tests._video_fixtures import encode_clip

CLASSES, PER_CLASS, BATCH = 8, 64, 16


def uniform_distinct(classes: int = CLASSES, per_class: int = PER_CLASS, batch: int = BATCH) -> float:
    """Expected distinct classes in `batch` samples drawn without replacement (hypergeometric)."""
    n = classes * per_class
    return classes * (1 - comb(n - per_class, batch) / comb(n, batch))


def labels_by_gid(out: Path, split: str = "train") -> np.ndarray:
    labels = []
    for info in SplitIndex.load(out, split).shards:
        with tarfile.open(out / info.name) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    return np.array(labels)


def mean_distinct(out: Path, window: int, epochs: int = 4) -> float:
    table, labels = ShardTable.from_index(SplitIndex.load(out, "train")), labels_by_gid(out)
    counts = [len(set(labels[b])) for e in range(epochs)
              for b in epoch_batches(table, 0, e, 1, 0, BATCH, train=True, window=window)]
    return float(np.mean(counts))


@pytest.fixture(scope="module")
def class_sorted_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sorted") / "videos"
    clip = encode_clip(4, height=32, width=32)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / f"class{c}" / f"v{i:03d}.mp4").write_bytes(clip)
    return root


def _shard(source: Path, out: Path, *extra: str, split: str = "train") -> None:
    assert shard.main(["--dataset", "folder", "--videos", str(source), "--split", split, "--out", str(out),
                       "--min-frames", "1", "--short-side", "0", "--workers", "1", "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def shuffled(class_sorted_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shuffled")
    _shard(class_sorted_source, out)  # the default: every split is shuffled
    return out


@pytest.mark.parametrize("window", [DataConfig().shuffle_buffer, 16])
def test_train_batches_cover_classes_like_a_random_draw(shuffled, window):
    # 512 samples: the default window (512) already permutes a whole epoch; a window of one batch stands
    # for a large dataset, where the window is a tiny fraction of the data (K400: 512 of 240k samples)
    expected = uniform_distinct()
    assert abs(mean_distinct(shuffled, window) - expected) < 0.1 * expected


def test_no_shuffle_keeps_the_class_sorted_order(class_sorted_source, shuffled, tmp_path):
    _shard(class_sorted_source, tmp_path, "--no-shuffle")
    labels = labels_by_gid(tmp_path)
    assert list(labels) == sorted(labels)  # what the old default gave: each shard one or two classes
    assert mean_distinct(tmp_path, window=16) < 0.5 * uniform_distinct()
    assert sorted(labels) == sorted(labels_by_gid(shuffled))  # the same samples, only the order differs


def test_shuffle_is_deterministic_in_the_seed(class_sorted_source, tmp_path):
    def order(name: str, *extra: str) -> list[str]:
        _shard(class_sorted_source, tmp_path / name, "--limit", "64", *extra)
        index = SplitIndex.load(tmp_path / name, "train")
        return [n for info in index.shards for n in tarfile.open(tmp_path / name / info.name).getnames()
                if n.endswith(".cls")]

    seed0 = order("a", "--seed", "0", "--shard-size", "10")
    assert order("b", "--seed", "0") == seed0 != order("c", "--seed", "1")
    assert seed0 != sorted(seed0)


def test_any_split_name_is_shuffled_and_limit_samples_every_class(class_sorted_source, tmp_path):
    """A split trained on need not be called `train*` (`fold1`, `k400_subset`): it was written class-sorted
    without a word; and `--limit N` took the first N sorted records, i.e. the first classes only."""
    _shard(class_sorted_source, tmp_path / "fold", split="fold1")
    labels = labels_by_gid(tmp_path / "fold", "fold1")
    assert list(labels) != sorted(labels) and len(labels) == CLASSES * PER_CLASS
    _shard(class_sorted_source, tmp_path / "trial", "--limit", str(PER_CLASS), split="fold1")
    assert len(set(labels_by_gid(tmp_path / "trial", "fold1"))) == CLASSES  # 64 of 512: every class drawn
