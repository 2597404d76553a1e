"""Splits of one output folder agree on their class list (issue 13, item 1, data_prep part).

`--dataset folder` builds a split's classes from its own subfolders: train a/b/c and val b/c gave
indices that meant different classes. Each split index records its class list (`classes`, names in
order); writing a split whose list differs from another split's in `--out` is refused unless
`--classes` is given.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep import shard
from data_prep.classes import describe_difference
from s4v.data.format import SplitIndex
from tests._video_fixtures import encode_clip


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(8, height=32, width=32)


def class_tree(root: Path, clip: bytes, classes: list[str]) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        (root / name / f"{name}0.mp4").write_bytes(clip)
    return root


def run(videos: Path, out: Path, split: str, *extra: str) -> int:
    return shard.main(["--dataset", "folder", "--videos", str(videos), "--split", split, "--out", str(out),
                       "--short-side", "0", "--workers", "1", "--no-progress", *extra])


def split_files(out: Path, split: str) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(f"*{split}*"))


def test_other_class_list_is_refused_unless_classes_given(clip, tmp_path, capsys):
    train = class_tree(tmp_path / "train", clip, ["a", "b", "c"])
    val = class_tree(tmp_path / "val", clip, ["b", "c"])
    out = tmp_path / "out"
    assert run(train, out, "train") == 0
    assert "warning: --classes not given" in capsys.readouterr().err
    assert SplitIndex.load(out, "train").classes == ["a", "b", "c"]

    assert run(val, out, "val") == 2
    err = capsys.readouterr().err
    assert "train-index.json has 3 classes, this split 2" in err and "only there: ['a']" in err
    assert f"--classes {out / 'train-index.json'}" in err and "Traceback" not in err
    assert split_files(out, "val") == []  # nothing written

    assert run(val, out, "val", "--classes", str(out / "train-index.json")) == 0  # the train list, reused
    index = SplitIndex.load(out, "val")
    assert index.classes == ["a", "b", "c"] and index.class_counts() == {1: 1, 2: 1}
    assert "warning: 1 of 3 classes have no sample in split 'val' (no usable video): ['a']" in capsys.readouterr().err


def test_explicit_other_classes_warn(clip, tmp_path, capsys):
    train = class_tree(tmp_path / "train", clip, ["a", "b"])
    out = tmp_path / "out"
    (tmp_path / "classes.txt").write_text("b\na\n")
    assert run(train, out, "train") == 0
    assert run(train, out, "val", "--classes", str(tmp_path / "classes.txt")) == 0
    err = capsys.readouterr().err
    assert "differs from another split" in err and "same names in another order" in err
    assert json.loads((out / "val-index.json").read_text())["classes"] == ["b", "a"]


def test_unfinished_split_counts_too(clip, tmp_path, capsys):
    """A split whose index is not written yet (an unfinished job array) is compared through its plan."""
    train = class_tree(tmp_path / "train", clip, ["a", "b"])
    out = tmp_path / "out"
    assert run(train, out, "train", "--num-jobs", "2", "--job-index", "0", "--shard-size", "1") == 0
    assert not (out / "train-index.json").exists()
    assert run(class_tree(tmp_path / "val", clip, ["b"]), out, "val") == 2
    assert ".s4v-journal/train/plan.json has 2 classes" in capsys.readouterr().err


def test_describe_difference():
    assert describe_difference(["a", "b"], ["a", "b", "c"]) == "only there: ['c']"
    assert describe_difference(["a", "x"], ["a"]) == "only in this split: ['x']"
    assert describe_difference(["b", "a"], ["a", "b"]) == (
        "same names in another order (class 0 is 'b' here, 'a' there)")
