"""Fixtures shared by the fault-injection tests: tiny shards written once per session."""
import pytest

from tests._video_fixtures import Spec, write_split

from tests._train_fixtures import CLASSES, NUM_CLASSES, write_tiny_shards


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory):
    """24 training clips (4 shards x 6, 12 frames, 32x32) and 8 val clips, all labels in range."""
    return write_tiny_shards(tmp_path_factory.mktemp("clean_shards"))


@pytest.fixture(scope="session")
def shards_with_bad_label(tmp_path_factory):
    """26 training clips in 4 shards (13 batches of 2 on one rank); clip `bad_label` has class 9 of 6."""
    root = tmp_path_factory.mktemp("bad_label_shards")
    shards = [[Spec(f"t{s}_{i}", 12, (s * 7 + i) % NUM_CLASSES, height=32, width=32) for i in range(7 if s < 2 else 6)]
              for s in range(4)]
    shards[2][3] = Spec("bad_label", 12, 9, height=32, width=32)
    write_split(root, "train", shards, classes=CLASSES)
    return root
