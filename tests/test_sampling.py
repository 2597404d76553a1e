"""Frame sampling, test crops and augmentation plans: hand-computed cases and seeding."""
import numpy as np
import pytest

from s4v.data.augment import parse_rand_augment, plan_sample, random_resized_crop, resized_size
from s4v.data.config import DataConfig
from s4v.data.sampling import (clip_indices, key_hash, sample_rng, segment_multiclip_indices,
                               segment_test_indices, segment_train_indices, eval_crop_boxes,
                               uniform_test_indices, uniform_train_indices)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_segment_train_one_frame_per_segment():
    # n=20, T=4: boundaries i*n//T = 0, 5, 10, 15, 20
    seen = np.stack([segment_train_indices(20, 4, rng(s)) for s in range(200)])
    for i, (lo, hi) in enumerate([(0, 5), (5, 10), (10, 15), (15, 20)]):
        assert seen[:, i].min() == lo and seen[:, i].max() == hi - 1
    # uneven: n=10, T=4 -> boundaries 0, 2, 5, 7, 10
    seen = np.stack([segment_train_indices(10, 4, rng(s)) for s in range(200)])
    assert [set(seen[:, i]) for i in range(4)] == [{0, 1}, {2, 3, 4}, {5, 6}, {7, 8, 9}]


def test_segment_short_video_random_repeats_sorted():
    for s in range(20):
        idx = segment_train_indices(3, 8, rng(s))
        assert len(idx) == 8 and list(idx) == sorted(idx) and set(idx) == {0, 1, 2}
    assert list(segment_train_indices(4, 4, rng())) == [0, 1, 2, 3]


def test_segment_test_middle():
    assert list(segment_test_indices(20, 4)) == [2, 7, 12, 17]  # i*5 + (5-1)/2
    assert list(segment_test_indices(3, 8)) == [0, 0, 0, 1, 1, 1, 2, 2]  # i*n//T
    assert list(segment_test_indices(9, 1)) == [4]


def test_segment_multiclip():
    # n=21, T=4: seg=5; clip k adds int(5/3*(k+1)) = 1, 3
    out = segment_multiclip_indices(21, 4, 2)
    assert out.tolist() == [[1, 6, 11, 16], [3, 8, 13, 18]]
    assert clip_indices("segment", 21, 4, train=False, clips=2).tolist() == out.tolist()
    assert clip_indices("segment", 20, 4, train=False, clips=1).tolist() == [[2, 7, 12, 17]]


def test_uniform_train_inclusive_ranges():
    # n=21, T=4: seg=5 -> [0,5], [5,10], [10,15], [15,20], both ends inclusive
    seen = np.stack([uniform_train_indices(21, 4, rng(s)) for s in range(400)])
    for i in range(4):
        assert set(seen[:, i]) == set(range(5 * i, 5 * i + 6))
    # n=10, T=4: seg=2.25 -> round: [0,2], [2,4], [4,7], [7,9]
    seen = np.stack([uniform_train_indices(10, 4, rng(s)) for s in range(400)])
    assert [(seen[:, i].min(), seen[:, i].max()) for i in range(4)] == [(0, 2), (2, 4), (4, 7), (7, 9)]


def test_uniform_test_clips():
    # n=24, T=4: stride 6, starts linspace(0, 5, 3) = 0, 2.5, 5
    assert uniform_test_indices(24, 4, 3).tolist() == [[0, 6, 12, 18], [2, 8, 14, 20], [5, 11, 17, 23]]
    assert uniform_test_indices(24, 4, 1).tolist() == [[0, 6, 12, 18]]
    assert uniform_test_indices(2, 4, 2).max() <= 1  # short video stays in range


def test_linspace_test_sampling_is_clip4clips_rule():
    """linspace(0, n-1, T) truncated: both ends included; repeats when the video is shorter than T."""
    assert clip_indices("linspace", 23, 12, False).tolist() == [[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]]
    assert clip_indices("linspace", 10, 4, False).tolist() == [[0, 3, 6, 9]]
    assert clip_indices("linspace", 3, 5, False).tolist() == [[0, 0, 1, 1, 2]]
    with pytest.raises(ValueError, match="one test clip"):
        clip_indices("linspace", 30, 4, False, clips=2)
    # the evaluation rule of a config: test_sampling when set, else sampling; training keeps `sampling`
    cfg = DataConfig(num_frames=4, sampling="segment", test_sampling="linspace", test_crops=1)
    assert plan_sample(cfg, "k", 0, 10, 64, 64, False, epoch=0).frames.tolist() == [[0, 3, 6, 9]]
    assert plan_sample(DataConfig(num_frames=4, sampling="segment", test_crops=1), "k", 0, 10, 64, 64, False,
                       epoch=0).frames.tolist() == [[0, 3, 5, 8]]  # segment middles
    train = plan_sample(cfg, "k", 0, 12, 64, 64, True, epoch=0).frames.tolist()[0]
    assert all(3 * i <= f < 3 * i + 3 for i, f in enumerate(train))  # one random frame per segment


def test_train_sampling_seeded():
    a = clip_indices("segment", 100, 8, True, rng=sample_rng(3, 1, "vid_a", 1))
    b = clip_indices("segment", 100, 8, True, rng=sample_rng(3, 1, "vid_a", 1))
    assert a.tolist() == b.tolist()
    others = [clip_indices("segment", 100, 8, True, rng=sample_rng(*args, 1)).tolist()
              for args in [(4, 1, "vid_a"), (3, 2, "vid_a"), (3, 1, "vid_b")]]
    assert all(o != a.tolist() for o in others)
    assert key_hash("abc") == 6455300059550759896  # stable across processes and Python versions
    with pytest.raises(ValueError):
        clip_indices("segment", 0, 8, False)


def test_eval_crop_boxes():
    assert eval_crop_boxes(256, 320, 224, 3) == [(16, 0, 240, 224), (16, 48, 240, 272), (16, 96, 240, 320)]
    assert eval_crop_boxes(320, 256, 224, 3) == [(0, 16, 224, 240), (48, 16, 272, 240), (96, 16, 320, 240)]
    assert eval_crop_boxes(256, 341, 224, 1) == [(16, 58, 240, 282)]
    assert eval_crop_boxes(100, 120, 224, 1) == [(0, 0, 100, 120)]


def test_random_resized_crop_bounds_and_seed():
    for s in range(100):
        y0, x0, y1, x1 = random_resized_crop(rng(s), 256, 320, (0.08, 1.0), (0.75, 4 / 3))
        assert 0 <= y0 < y1 <= 256 and 0 <= x0 < x1 <= 320
        assert 0.07 <= (y1 - y0) * (x1 - x0) / (256 * 320) <= 1.0
    assert random_resized_crop(rng(0), 256, 320, (0.08, 1), (0.75, 4 / 3)) == (2, 4, 252, 223)


def test_resize_modes():
    cfg = DataConfig()
    assert resized_size(cfg, 240, 320) == (256, 341) and resized_size(cfg, 320, 240) == (341, 256)
    cfg.resize_mode = "fixed"
    assert resized_size(cfg, 100, 100) == (256, 320)


def test_plan_sample_train_and_eval():
    cfg = DataConfig(repeated_aug=2, flip_prob=1.0, flip_label_swap=[[86, 87]], grayscale_prob=0.0,
                     rand_augment="rand-m7-n4-mstd0.5-inc1")
    p1 = plan_sample(cfg, "k", 86, 50, 240, 320, True, epoch=0)
    p2 = plan_sample(cfg, "k", 86, 50, 240, 320, True, epoch=0)
    p3 = plan_sample(cfg, "k", 86, 50, 240, 320, True, epoch=1)
    assert p1.frames.tolist() == p2.frames.tolist() and p1.views == p2.views
    assert p1.frames.tolist() != p3.frames.tolist() or p1.views != p3.views
    assert len(p1.views) == 2 and p1.views[0].box != p1.views[1].box  # independent copies, shared frames
    assert all(v.flip and v.label == 87 and len(v.ra) == 4 for v in p1.views)
    ev = DataConfig(test_clips=2, test_crops=3, sampling="segment")
    pe = plan_sample(ev, "k", 5, 21, 240, 320, False, epoch=7)
    assert pe.frames.shape == (2, 8) and len(pe.views) == 6
    assert [v.clip for v in pe.views] == [0, 0, 0, 1, 1, 1] and not any(v.flip or v.gray for v in pe.views)
    assert plan_sample(ev, "k", 5, 21, 240, 320, False, epoch=0).views == pe.views


def test_rand_augment_spec():
    s = parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    assert (s.n, s.m, s.mstd) == (4, 7, 0.5)
    for bad in ["auto-m7", "rand-m40", "rand-q3"]:
        with pytest.raises(ValueError):
            parse_rand_augment(bad)
