"""data_prep end to end: transcoding, shards, .idx, rejects, determinism, resume, job arrays."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep import shard
from data_prep.mp4 import box_order
from data_prep.transcode import resample_cfr
from data_prep.writer import STOP_ENV
from s4v.data.format import ClipMeta, SplitIndex

WDS2IDX = Path(sys.executable).parent / "wds2idx"


def make_video(path: Path, frames: int, w: int = 64, h: int = 48, fps: int = 25, codec: str = "libx264") -> Path:
    """A tiny clip with a moving bar; frame i has its bar at column 3*i (so frames are identifiable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            a = np.full((h, w, 3), 40, np.uint8)
            a[:, (3 * i) % (w - 6):(3 * i) % (w - 6) + 6] = 230
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "videos"
    for i in range(3):
        make_video(root / "cat" / f"c{i}.mp4", 20 + i)
    make_video(root / "dog" / "d0.mp4", 30, fps=30)
    make_video(root / "dog" / "d1.webm", 24, codec="libvpx-vp9")
    make_video(root / "dog" / "tall.mp4", 12, w=32, h=64)
    make_video(root / "dog" / "short.mp4", 4)
    (root / "cat" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    return root


def run_shard(videos: Path, out: Path, *extra: str, dataset: str = "folder") -> int:
    argv = ["--dataset", dataset, "--videos", str(videos), "--split", "train", "--out", str(out),
            "--shard-size", "3", "--short-side", "32", "--workers", "1", "--no-progress", *extra]
    return shard.main(argv)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def shard_content(out: Path) -> dict[str, list]:
    """Every shard's members in order, with the bytes of all but the video (libx264 output is not
    always byte-identical between runs; see data_prep/transcode.py), and each video's frame count."""
    content = {}
    for p in sorted(out.glob("train-*.tar")):
        members = []
        for name, data in read_tar(p):
            if name.endswith(".mp4"):
                with av.open(io.BytesIO(data)) as c:
                    data = sum(1 for _ in c.decode(video=0))
            members.append((name, data))
        content[p.name] = members
    return content


@pytest.fixture(scope="module")
def sharded(folder_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    assert run_shard(folder_dataset, out) == 0
    return out


def test_shard_folder_end_to_end(sharded, capsys):
    out = sharded
    index = SplitIndex.load(out, "train")
    assert index.dataset == "folder" and index.classes == ["cat", "dog"] and index.codec == "h264"
    # 8 inputs in 3 groups of 3: cat/broken, cat/c0..2 | dog/d0, d1, short | tall
    assert [s.name for s in index.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert index.num_samples == 6 and index.class_counts() == {0: 3, 1: 3}
    rejects = [json.loads(line) for line in (out / "train-rejects.jsonl").read_text().splitlines()]
    assert {r["source_id"]: r["reason"].split(":")[0] for r in rejects} == {"cat/broken": "cannot open",
                                                                          "dog/short": "too short"}
    assert "4 frames < --min-frames 8" in [r for r in rejects if r["source_id"] == "dog/short"][0]["reason"]
    expected_frames = {"cat/c0": 20, "cat/c1": 21, "cat/c2": 22, "dog/d0": 30, "dog/d1": 24, "dog/tall": 12}
    seen, total = set(), 0.0
    for info in index.shards:
        members = read_tar(out / info.name)
        assert info.samples == len(members) // 3
        by_key: dict[str, dict[str, bytes]] = {}
        for name, data in members:
            key, ext = name.split(".", 1)
            by_key.setdefault(key, {})[ext] = data
        for key, files in by_key.items():
            assert set(files) == {"mp4", "cls", "json"}
            meta = ClipMeta.from_json(files["json"])
            assert key not in seen and meta.source_id.replace("/", "_") == key
            seen.add(key)
            assert int(files["cls"].decode()) == ["cat", "dog"].index(meta.label)
            assert meta.frames == expected_frames[meta.source_id] and meta.codec == "h264"
            assert min(meta.width, meta.height) == 32 and meta.width % 2 == 0 and meta.height % 2 == 0
            assert box_order(files["mp4"]).index("moov") < box_order(files["mp4"]).index("mdat")  # faststart
            with av.open(io.BytesIO(files["mp4"])) as c:
                frames = list(c.decode(video=0))
            assert len(frames) == meta.frames and (frames[0].width, frames[0].height) == (meta.width, meta.height)
            # closed GOPs of 16, no B-frames
            assert [i for i, f in enumerate(frames) if f.key_frame] == list(range(0, len(frames), 16))
            assert {av.video.frame.PictureType(f.pict_type).name for f in frames} <= {"I", "P"}
            assert meta.fps == (30.0 if meta.source_id == "dog/d0" else 25.0)
            total += meta.duration
    assert seen == {k.replace("/", "_") for k in expected_frames}
    assert index.duration == pytest.approx(total)
    assert (out / "train-000002.tar").is_file() and "tall" in (out / "train-000002.idx").read_text()


def test_idx_equals_wds2idx(sharded, tmp_path):
    assert WDS2IDX.is_file(), f"DALI's wds2idx not found at {WDS2IDX}"
    for tar in sorted(sharded.glob("train-*.tar")):
        ref = tmp_path / (tar.stem + ".idx")
        subprocess.run([str(WDS2IDX), str(tar), str(ref)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text() == ref.read_text()


def test_deterministic_and_parallel_equal(folder_dataset, sharded, tmp_path):
    out = tmp_path / "again"
    assert run_shard(folder_dataset, out, "--workers", "2") == 0
    assert shard_content(out) == shard_content(sharded)
    assert json.loads((out / "train-index.json").read_text()) == json.loads((sharded / "train-index.json").read_text())


def test_resume_after_interrupt(folder_dataset, sharded, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    monkeypatch.setenv(STOP_ENV, "1")
    assert run_shard(folder_dataset, out) == 3  # stopped after the first shard group
    assert not (out / "train-index.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    first = (out / "train-000000.tar").stat().st_mtime_ns
    # a crash mid-way through the second group: a partial tar under its final name, no journal entry
    (out / "train-000001.tar").write_bytes(b"partial" * 10)
    monkeypatch.delenv(STOP_ENV)
    assert run_shard(folder_dataset, out) == 0
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # finished shard not redone
    assert shard_content(out) == shard_content(sharded)
    keys = [name for p in sorted(out.glob("*.tar")) for name, _ in read_tar(p)]
    assert len(keys) == len(set(keys)) == 18
    assert (out / "train-rejects.jsonl").read_text() == (sharded / "train-rejects.jsonl").read_text()
    # a finished split reruns as a no-op; other settings into the same folder are refused
    assert run_shard(folder_dataset, out) == 0
    assert run_shard(folder_dataset, out, "--shard-size", "4") == 2


def test_job_array_and_merge(folder_dataset, sharded, tmp_path, capsys):
    out = tmp_path / "array"
    assert run_shard(folder_dataset, out, "--num-jobs", "2", "--job-index", "1") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000001.tar"]
    assert shard.main(["--merge-index", "--out", str(out), "--split", "train"]) == 2
    assert "not finished" in capsys.readouterr().err
    assert run_shard(folder_dataset, out, "--num-jobs", "2", "--job-index", "0") == 0  # last one merges
    assert shard_content(out) == shard_content(sharded)
    assert (out / "train-index.json").read_text() == (sharded / "train-index.json").read_text()
    (out / "train-index.json").unlink()
    assert shard.main(["--merge-index", "--out", str(out), "--split", "train"]) == 0
    assert (out / "train-index.json").read_text() == (sharded / "train-index.json").read_text()


def test_slurm_env_defaults(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    args = shard.build_parser().parse_args(["--split", "train", "--out", "x"])
    assert (args.num_jobs, args.job_index) == (4, 2)


def test_max_shard_bytes_splits_into_parts(folder_dataset, tmp_path):
    out = tmp_path / "capped"
    assert run_shard(folder_dataset, out, "--max-shard-bytes", "4k") == 0
    index = SplitIndex.load(out, "train")
    assert index.num_samples == 6 and len(index.shards) > 3
    assert "train-000000-01.tar" in [s.name for s in index.shards]
    for s in index.shards:
        assert (out / s.name).is_file() and (out / s.name).with_suffix(".idx").is_file()
        assert s.samples == 1 or (out / s.name).stat().st_size <= 4096 + 10240


def test_vp9_fps_and_trim(tmp_path):
    make_video(tmp_path / "src" / "long.mp4", 50, fps=25)  # 2 s
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "src/long.mp4", "label": "a", "id": "whole"}) + "\n"
                        + json.dumps({"path": "src/long.mp4", "label": "a", "id": "cut", "start": 0.4, "end": 1.4})
                        + "\n")
    # manifest rows are keyed by path: use two manifests for two ranges of one file
    rows = manifest.read_text().splitlines()
    (tmp_path / "m1.jsonl").write_text(rows[0] + "\n")
    (tmp_path / "m2.jsonl").write_text(rows[1] + "\n")
    out = tmp_path / "out"
    common = ["--dataset", "manifest", "--split", "train", "--short-side", "32", "--workers", "1", "--no-progress"]
    assert shard.main([*common, "--annotations", str(tmp_path / "m1.jsonl"), "--out", str(out / "a"),
                       "--codec", "vp9", "--fps", "10"]) == 0
    assert shard.main([*common, "--annotations", str(tmp_path / "m2.jsonl"), "--out", str(out / "b")]) == 0
    assert shard.main([*common, "--annotations", str(tmp_path / "m1.jsonl"), "--out", str(out / "c"),
                       "--max-seconds", "0.5"]) == 0
    metas = {}
    for sub in "abc":
        (name, _), (_, cls), (_, js) = read_tar(out / sub / "train-000000.tar")
        metas[sub] = ClipMeta.from_json(js)
    assert (metas["a"].codec, metas["a"].fps, metas["a"].frames) == ("vp9", 10.0, 20)
    assert SplitIndex.load(out / "a", "train").codec == "vp9"
    assert metas["b"].frames == 25 and metas["b"].extra["time_range"] == [0.4, 1.4]
    assert metas["c"].frames == 12 or metas["c"].frames == 13
    # the trimmed clip starts at source frame 10: its bar spans columns 30..35 of 64, i.e. centre 21.7 of 42
    (name, mp4), _, _ = read_tar(out / "b" / "train-000000.tar")
    with av.open(io.BytesIO(mp4)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="gray")
    assert first.shape == (32, 42) and abs(int(np.argmax(first.mean(0))) - 21.7) <= 1.5


def test_resample_cfr_variable_rate():
    # VFR source: frames at irregular times; 10 fps output over 0.5 s
    times = [0.0, 0.05, 0.21, 0.30, 0.41]
    out = list(resample_cfr([(t, i) for i, t in enumerate(times)], src_rate=20, fps=10))
    assert out == [0, 1, 2, 3, 4]  # slots 0..4 -> latest frame at or before each
    out = list(resample_cfr([(t, i) for i, t in enumerate([0.0, 0.25, 0.5])], src_rate=4, fps=8))
    assert out == [0, 0, 1, 1, 2, 2]  # duplicated up to the last frame's duration
    assert list(resample_cfr([(i / 30, i) for i in range(30)], src_rate=30, fps=15)) == list(range(0, 30, 2))
    assert len(list(resample_cfr([(i / 25, i) for i in range(100)], 25, 25, max_duration=1.0))) == 25


def test_ssv1_frame_folders(tmp_path):
    from PIL import Image

    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "something-something-v1-labels.csv").write_text("Holding something\nPushing something\n")
    (ann / "something-something-v1-train.csv").write_text("11;Pushing something\n12;Holding something\n13;Holding something\n")
    root = tmp_path / "20bn-something-something-v1"
    for vid, n in (("11", 10), ("12", 9)):
        (root / vid).mkdir(parents=True)
        for i in range(n):
            a = np.full((48, 64, 3), 20 * i, np.uint8)
            Image.fromarray(a).save(root / vid / f"{i + 1:05d}.jpg", quality=95)
    (root / "13").mkdir()
    (root / "13" / "00001.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert shard.main(["--dataset", "ssv1", "--videos", str(tmp_path), "--annotations", str(ann), "--split", "train",
                       "--out", str(out), "--short-side", "32", "--min-frames", "1", "--workers", "1",
                       "--no-progress"]) == 0
    index = SplitIndex.load(out, "train")
    assert index.num_samples == 2 and index.class_counts() == {0: 1, 1: 1}
    by_key = {}
    for name, data in read_tar(out / "train-000000.tar"):
        key, ext = name.split(".", 1)
        by_key.setdefault(key, {})[ext] = data
    meta = ClipMeta.from_json(by_key["11"]["json"])
    assert (meta.frames, meta.fps, meta.width, meta.height, meta.label) == (10, 12.0, 42, 32, "Pushing something")
    with av.open(io.BytesIO(by_key["11"]["mp4"])) as c:
        lum = [f.to_ndarray(format="gray").mean() for f in c.decode(video=0)]
    assert np.all(np.diff(lum) > 5)  # frame order kept (brightness ramps up)
    reject = json.loads((out / "train-rejects.jsonl").read_text())
    assert reject["source_id"] == "13" and "transcode failed" in reject["reason"]


def test_cli_errors_name_the_missing_file(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    rc = shard.main(["--dataset", "ssv2", "--videos", str(tmp_path / "v"), "--annotations", str(tmp_path),
                     "--split", "train", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and str(tmp_path / "labels.json") in capsys.readouterr().err


def test_manifest_time_ranges_outside_the_video_are_rejected(tmp_path, capsys):
    """Issue 13, item 3: a range must lie inside the video (24 frames at 25 fps: 0.96 s)."""
    src = make_video(tmp_path / "src.mp4", 24)
    rows = {"ok": {"start": 0.2, "end": 0.6}, "neg": {"start": -1}, "late_end": {"start": 0.5, "end": 2.0},
            "late_start": {"start": 5.0}, "nolabel": {}}
    lines = []
    for name, extra in rows.items():
        (tmp_path / f"{name}.mp4").write_bytes(src.read_bytes())  # manifest rows are keyed by path
        lines.append(json.dumps({"path": f"{name}.mp4", "id": name, **({} if name == "nolabel" else {"label": "a"}),
                                 **extra}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert shard.main(["--dataset", "manifest", "--annotations", str(tmp_path / "m.jsonl"), "--split", "train",
                       "--out", str(out), "--min-frames", "1", "--workers", "1", "--no-progress"]) == 0
    lines = (out / "train-rejects.jsonl").read_text().splitlines()
    rejects = {r["source_id"]: r["reason"] for r in map(json.loads, lines)}
    assert rejects == {"neg": "bad time range: start -1 s is negative",
                       "late_end": "time range outside the video: 0.5..2 s, the video ends at 0.960 s",
                       "late_start": "time range outside the video: starts at 5 s, the video ends at 0.960 s",
                       "nolabel": "no label and no caption in the manifest"}
    assert "1 samples, 4 rejected" in capsys.readouterr().out
    index = SplitIndex.load(out, "train")
    (_, _), (_, _), (_, js) = read_tar(out / index.shards[0].name)
    assert ClipMeta.from_json(js).frames == 10  # 0.4 s at 25 fps


def test_same_stem_kept_small_sources_not_upscaled_empty_class_warns(tmp_path, capsys):
    """Issue 13, item 10."""
    videos = tmp_path / "videos"
    make_video(videos / "cat" / "clip.mkv", 10)
    make_video(videos / "cat" / "clip.mp4", 12)
    make_video(videos / "cat" / "small.mp4", 10, w=40, h=32)
    make_video(videos / "cat" / "big.mp4", 10, w=96, h=64)
    (videos / "dog").mkdir()
    out = tmp_path / "out"
    assert shard.main(["--dataset", "folder", "--videos", str(videos), "--split", "train", "--out", str(out),
                       "--short-side", "48", "--shard-size", "4", "--min-frames", "1", "--workers", "1",
                       "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 class folder(s)" in err and "['dog']" in err
    assert "1 of 2 classes have no sample in split 'train' (no usable video): ['dog']" in err
    assert not (out / "train-rejects.jsonl").read_text()
    metas = {}
    for name, data in read_tar(out / "train-000000.tar"):
        if name.endswith(".json"):
            meta = ClipMeta.from_json(data)
            metas[name[:-5]] = (meta.source_id, meta.frames, meta.width, meta.height)
    assert metas == {"cat_clip_mkv": ("cat/clip.mkv", 10, 64, 48), "cat_clip_mp4": ("cat/clip.mp4", 12, 64, 48),
                     "cat_small": ("cat/small", 10, 40, 32),  # smaller than --short-side: kept (was 60x48)
                     "cat_big": ("cat/big", 10, 72, 48)}


def test_output_size_never_upscales():
    from data_prep.transcode import output_size

    assert output_size(64, 48, 320) == (64, 48)  # was 426x320
    assert output_size(63, 47, 320) == (64, 48)  # even sides
    assert output_size(640, 480, 320) == (426, 320) and output_size(64, 48, 0) == (64, 48)
