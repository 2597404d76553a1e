"""data_prep.synthetic: order-dependent labels, shards in the s4v format, PyAV and DALI CPU decoding."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep import synthetic
from data_prep.synthetic import (REVERSE, TASKS, ClipParams, make_records, render, render_clip, reverse_params,
                                 sample_params)
from s4v.data.format import ClipMeta, SplitIndex


@pytest.mark.parametrize("task", ["pair4", "dir4"])
def test_reversed_clip_is_the_reverse_class(task):
    rng = np.random.default_rng(0)
    for i in range(40):
        p = sample_params(rng, task, i % 4, 32, 8)
        r = reverse_params(p)
        assert r.label == REVERSE[task][p.label] != p.label
        frames, back = render(p), render(r)
        np.testing.assert_allclose(back, frames[::-1], atol=1e-5)  # same frames, opposite order
        # so an order-free summary (the frame set, the frame mean) cannot tell the two classes apart
        np.testing.assert_allclose(back.mean(0), frames.mean(0), atol=1e-5)


def test_pair4_geometry_and_symmetry():
    rng = np.random.default_rng(1)
    first_x = {0: [], 2: []}
    for i in range(4000):
        label = i % 4
        p = sample_params(rng, "pair4", label, 32, 8)
        h = [s for s in p.shapes if s.vx != 0]
        v = [s for s in p.shapes if s.vy != 0]
        assert len(h) == len(v) == 1 and h[0].vy == 0 and v[0].vx == 0
        assert (h[0].vx > 0) == (label >= 2) and (v[0].vy > 0) == (label % 2 == 1)
        for s in p.shapes:  # the whole trajectory stays inside the frame
            for t in (-3.5, 3.5):
                x, y = s.cx + s.vx * t, s.cy + s.vy * t
                assert s.half - 1e-9 <= x <= 32 - s.half + 1e-9 and s.half - 1e-9 <= y <= 32 - s.half + 1e-9
            assert 1.0 <= abs(s.vx + s.vy) <= 2.2 and 2 <= s.half <= 4
        if label in (0, 2):
            first_x[label].append(h[0].cx)
    # trajectory centres do not depend on the direction (no position cue in the frame average)
    assert abs(np.mean(first_x[0]) - np.mean(first_x[2])) < 0.6 and abs(np.mean(first_x[0]) - 16) < 0.6


def test_records_balanced_deterministic_and_captioned():
    a, b = make_records("val", 40, "pair4", 32, 8, 999), make_records("val", 40, "pair4", 32, 8, 999)
    assert [r.extra for r in a] == [r.extra for r in b]
    assert Counter(r.label_index for r in a) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert [r.label_index for r in a[:8]] != [0, 1, 2, 3, 0, 1, 2, 3]  # shuffled, not cyclic
    for r in a:
        h, v = TASKS["pair4"][r.label_index].split("_")
        assert f"moves {h}" in r.captions[0] and f"moves {v}" in r.captions[0]
    clip = render_clip(ClipParams.from_dict(a[0].extra["params"]), a[0].extra["noise_seed"])
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    assert not np.array_equal(clip[0], clip[1])


def decode_samples(tar_path: Path) -> list[tuple[np.ndarray, int, ClipMeta]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    result = []
    for files in samples.values():
        with av.open(io.BytesIO(files["mp4"])) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        result.append((frames, int(files["cls"]), ClipMeta.from_json(files["json"])))
    return result


@pytest.fixture(scope="module")
def vp9_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn_vp9")
    synthetic.generate(out, train=24, val=8, codec="vp9", shard_size=10, workers=1, progress=False)
    return out


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_generate_shards(codec, vp9_dir, tmp_path):
    out = vp9_dir if codec == "vp9" else tmp_path
    if codec == "h264":
        assert synthetic.main(["--out", str(out), "--train", "24", "--val", "8", "--codec", "h264",
                               "--shard-size", "10", "--workers", "2", "--no-progress"]) == 0
    train, val = SplitIndex.load(out, "train"), SplitIndex.load(out, "val")
    assert (train.num_samples, val.num_samples) == (24, 8) and [s.samples for s in train.shards] == [10, 10, 4]
    assert train.classes == TASKS["pair4"] and train.codec == codec and train.dataset == "synthetic-pair4"
    assert train.class_counts() == {0: 6, 1: 6, 2: 6, 3: 6} and val.class_counts() == {0: 2, 1: 2, 2: 2, 3: 2}
    assert all(p.with_suffix(".idx").is_file() for p in train.shard_paths(out) + val.shard_paths(out))
    for frames, label, meta in decode_samples(out / "val-000000.tar"):
        assert frames.shape == (8, 32, 32, 3) and meta.codec == codec and meta.frames == 8 and meta.fps == 8.0
        assert meta.label == TASKS["pair4"][label] and meta.captions and meta.extra["params"]["label"] == label
        # the decoded clip is close to the rendered one (lossy, tiny frames: a loose bound)
        p = ClipParams.from_dict(meta.extra["params"])
        ref = render_clip(p, meta.extra["noise_seed"]).astype(np.float32)
        assert np.abs(frames.astype(np.float32) - ref).mean() < 20


def test_val_set_independent_of_train_seed(vp9_dir, tmp_path):
    synthetic.generate(tmp_path, train=4, val=8, codec="vp9", seed=5, shard_size=10, workers=1, progress=False)
    def metas(root: Path, name: str) -> list[bytes]:
        with tarfile.open(root / name) as tar:
            return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]

    assert metas(tmp_path, "val-000000.tar") == metas(vp9_dir, "val-000000.tar")  # same params and seeds
    assert metas(tmp_path, "train-000000.tar") != metas(vp9_dir, "train-000000.tar")


def test_dali_cpu_decodes_vp9_shards(vp9_dir):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    index = SplitIndex.load(vp9_dir, "val")
    tars = [str(p) for p in index.shard_paths(vp9_dir)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def pipe():
        video, cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                           ext=["mp4", "cls"], missing_component_behavior="error", name="R")
        return fn.decoders.video(video, device="cpu"), cls

    p = pipe()
    p.build()
    labels = []
    for _ in range(2):
        frames, cls = p.run()
        for i in range(len(frames)):
            assert np.asarray(frames[i]).shape == (8, 32, 32, 3)
            labels.append(int(bytes(np.asarray(cls[i])).decode()))
    assert Counter(labels) == Counter({0: 2, 1: 2, 2: 2, 3: 2})
    assert dali.__version__


# --- every option that changes the output is part of the fingerprint (issue 13, item 9)
BASE = {"--train": "4", "--val": "2", "--size": "16", "--frames": "4", "--codec": "vp9", "--task": "pair4",
        "--seed": "0", "--fps": "8", "--crf": "30", "--shard-size": "4"}
CHANGED = {"--train": "5", "--val": "3", "--size": "24", "--frames": "5", "--codec": "h264", "--task": "dir4",
           "--seed": "1", "--fps": "10", "--crf": "31", "--shard-size": "2"}


def synth_argv(out: Path, **changes: str) -> list[str]:
    options = {**BASE, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
    return ["--out", str(out), *[x for kv in options.items() for x in kv], "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_fp")
    assert synthetic.main(synth_argv(out)) == 0
    return out


def test_every_option_covers_the_options_of_the_cli():
    assert set(BASE) == set(CHANGED) == {a.option_strings[0] for a in synthetic.build_parser()._actions
                                         if a.option_strings and a.dest not in ("help", "out", "workers",
                                                                                "no_progress", "overwrite")}


@pytest.mark.parametrize("option", sorted(CHANGED))
def test_changed_option_is_not_taken_for_done(small_synth, option, capsys):
    """Was: `--size 24` into a 16 px folder said "1 already done" and kept the 16 px clips."""
    before = (small_synth / "train-index.json").read_bytes(), (small_synth / "val-index.json").read_bytes()
    assert synthetic.main(synth_argv(small_synth, **{option[2:]: CHANGED[option]})) == 2
    assert "made from other records or settings" in capsys.readouterr().err
    assert ((small_synth / "train-index.json").read_bytes(), (small_synth / "val-index.json").read_bytes()) == before


def test_same_options_are_done_and_overwrite_replaces(small_synth, tmp_path, capsys):
    assert synthetic.main(synth_argv(small_synth)) == 0
    assert "(0 written, 1 already done)" in capsys.readouterr().out
    out = tmp_path / "copy"
    assert synthetic.main(synth_argv(out)) == 0
    assert synthetic.main(synth_argv(out, size="24") + ["--overwrite"]) == 0
    for frames, _, meta in decode_samples(out / "val-000000.tar"):
        assert frames.shape == (4, 24, 24, 3) and meta.width == 24
