"""Issue 15: a trained model on anyone's video files (`s4v.load`, `s4v.read_video`, `s4v predict`,
`s4v export`). One tiny model is trained once (ZeRO-3, the tiny CPU setting, ~20 s) for the module."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import s4v
from s4v.data.config import DataConfig
from s4v.infer.preprocess import Preprocess
from s4v.infer.video_file import VideoReadError, read_clip
from tests._media_files import EXTENSIONS, FORMATS, has_encoder, write_video
from tests._train_fixtures import CLASSES, REPO, result_json, run_train, tiny_overrides, write_tiny_shards
from tests._video_fixtures import Spec, frame_index_of, write_split

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
TEST_SPECS = [  # held-out clips that differ in content, length and shape (so the model's scores differ)
    Spec(f"t{i}", frames, i % len(CLASSES), height=h, width=w, pattern=pat)
    for i, (frames, h, w, pat) in enumerate([(12, 32, 32, "solid"), (16, 32, 48, "ramp"), (9, 48, 32, "ramp"),
                                             (20, 32, 64, "solid"), (7, 32, 32, "ramp"), (24, 40, 56, "ramp")])]


def s4v_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s4v.cli.main", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def unnormalise(video: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DataConfig.mean).view(3, 1, 1) * 255
    std = torch.tensor(DataConfig.std).view(3, 1, 1) * 255
    return video * std + mean


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny recognition run (ZeRO-3, checkpoints at steps 6 and 12, exported) and a held-out split."""
    tmp = tmp_path_factory.mktemp("predict")
    root = write_tiny_shards(tmp / "data")
    write_split(root, "test", [TEST_SPECS[:3], TEST_SPECS[3:]], classes=CLASSES)
    run_train(tiny_overrides(root, tmp / "runs", "tiny", **{
        "train.export": True, "train.epochs": 1, "train.ckpt_every_steps": 6,
        "engine.ds_config": "ds_configs/zero3_fp32.json"}))
    clips = tmp / "clips"  # the held-out clips as plain files, as a user has them
    clips.mkdir()
    for shard in sorted(root.glob("test-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".mp4"):
                    (clips / m.name).write_bytes(tf.extractfile(m).read())
    return {"root": root, "run": tmp / "runs" / "tiny", "clips": clips, "tmp": tmp}


# ------------------------------------------------------------------------------------ reading files
CASES = [("mp4_h264", {}), ("webm_vp9", {}), ("mkv_hevc", {}), ("avi_mpeg4", {}), ("mov_h264", {}),
         ("mp4_h264", {"vfr": True}), ("webm_vp9", {"vfr": True}), ("mp4_h264", {"rotation": 90, "audio": True}),
         ("mov_h264", {"rotation": -90}), ("webm_vp9", {"rotation": 180, "audio": True})]


@pytest.mark.parametrize("fmt,extra", CASES, ids=[f"{f}-{'-'.join(map(str, e.items())) or 'plain'}" for f, e in CASES])
def test_every_container_and_codec_reads_the_right_frames_the_right_way_up(tmp_path, fmt, extra):
    if not has_encoder(FORMATS[fmt][1]):
        pytest.skip(f"the bundled FFmpeg has no {FORMATS[fmt][1]} encoder")
    path = write_video(tmp_path / f"v.{EXTENSIONS[FORMATS[fmt][0]]}", fmt, frames=12, height=32, width=64, **extra)
    cfg = DataConfig(num_frames=4, image_size=32, resize_short=32, test_clips=2)
    clip = read_clip(path, cfg)
    assert clip.video.shape == (2, 4, 3, 32, 32) and clip.num_frames == 12
    assert clip.rotation == extra.get("rotation", 0) % 360 and clip.size == (32, 64)  # as displayed
    pix = unnormalise(clip.video)
    top, bottom = pix[..., 2:12, :].mean(dim=(-1, -2, -3)), pix[..., 20:30, :].mean(dim=(-1, -2, -3))
    assert (bottom < 20).all() and (top > bottom + 10).all(), (top, bottom)  # the bright half on top
    seen = np.vectorize(frame_index_of)(top.numpy())
    assert seen.tolist() == clip.frames.tolist()  # the frames decoded are the frames planned


def test_read_video_and_create_model_preprocess(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames=10, height=32, width=64)
    video = s4v.read_video(path, num_frames=4, image_size=32, crops=3, clips=2)
    assert video.shape == (6, 4, 3, 32, 32)
    model, pre = s4v.create_model("s4v_tiny", 3, 4, return_preprocess=True)
    assert isinstance(pre, Preprocess) and pre.data.num_frames == 4 and pre.data.image_size == 32
    assert model(pre(path)).shape == (1, 3)
    assert torch.equal(pre.with_views(3, 2)(path), video)  # the same protocol, other views


def test_a_file_gives_exactly_the_eval_loaders_tensor(trained):
    """The same clip from a shard (PyAV eval loader) and from a file: the same frames and crops, to the bit."""
    from s4v.data.loader import build_loader

    cfg = DataConfig(root=str(trained["root"]), loader="pyav", num_frames=4, image_size=32, resize_short=36,
                     test_crops=3, test_clips=2, batch_size=3, num_workers=0, min_shards_per_reader=0)
    pre = Preprocess(cfg)
    n = 0
    for batch in build_loader(cfg, "test", train=False):
        for key, video, ok in zip(batch["key"], batch["video"], batch["valid"]):
            if ok:
                assert torch.equal(pre(trained["clips"] / f"{key}.mp4"), video), key
                n += 1
    assert n == len(TEST_SPECS)


# ------------------------------------------------------------------------------------------ predict
def eval_scores(run: Path, root: Path) -> dict[str, torch.Tensor]:
    """key -> view-averaged probabilities, by s4v eval's own loader and prediction code (3 crops x 2 clips)."""
    from s4v.data.loader import build_loader
    from s4v.eval.evaluate import predict
    from s4v.infer.source import run_config

    cfg = run_config(run)
    data = dataclasses.replace(cfg.data, root=str(root), test_crops=3, test_clips=2)
    model = s4v.load_model(run / "model_side_head.pt")
    return {k: v[0] for k, v in predict(model, build_loader(data, "test", train=False), torch.device("cpu")).items()}


def test_predict_classifies_held_out_clips_as_eval_does(trained):
    out = trained["tmp"] / "preds.jsonl"
    proc = s4v_cli("predict", str(trained["run"]), str(trained["clips"]), "--views", "3x2", "--topk", "6",
                   "--out", str(out), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 of 6 videos classified, 0 unreadable" in proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [Path(x["path"]).stem for x in lines] == sorted(s.key for s in TEST_SPECS)
    expected = eval_scores(trained["run"], trained["root"])
    for line in lines:
        key = Path(line["path"]).stem
        probs = torch.tensor([dict(line["top"])[c] for c in CLASSES])
        assert torch.allclose(probs, expected[key], atol=2e-6), key
        assert line["top"][0][0] == CLASSES[int(expected[key].argmax())]
        assert len(line["frames"]) == 2 and len(line["frames"][0]) == 4
    proc = s4v_cli("eval", str(trained["run"]), "data.val_split=test", "data.test_crops=3", "data.test_clips=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = {s.key: CLASSES[s.label] for s in TEST_SPECS}
    top1 = np.mean([x["top"][0][0] == labels[Path(x["path"]).stem] for x in lines])
    assert top1 == pytest.approx(result_json(proc.stdout)["top1"])


def zero_frame_mp4(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()  # the header is written, no frame ever is
    return path


def test_unreadable_files_are_counted_lines_and_never_stop_the_run(trained, tmp_path, capsys):
    from s4v.infer.predict import main

    good = shutil.copy(trained["clips"] / "t0.mp4", tmp_path / "good.mp4")
    data = write_video(tmp_path / "long.mp4", frames=40, height=64, width=96).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # index at the end: cut off
    faststart = tmp_path / "faststart.mp4"  # index first: the frames' data cut off
    with av.open(str(tmp_path / "long.mp4")) as src, av.open(str(faststart), "w",
                                                             options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for pkt in src.demux(src.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = out
                dst.mux(pkt)
    data = faststart.read_bytes()
    (tmp_path / "cut_faststart.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.mp4").write_text("not a video")
    zero_frame_mp4(tmp_path / "empty.mp4")
    files = [tmp_path / n for n in ("missing.mp4", "text.mp4", "cut.mp4", "cut_faststart.mp4", "empty.mp4")]
    rc = main([str(trained["run"]), *map(str, files), str(good), "--out", str(tmp_path / "p.jsonl"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "1 of 6 videos classified, 5 unreadable" in err and "Traceback" not in err
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    reasons = {Path(x["path"]).name: x.get("error") for x in lines}
    assert reasons["missing.mp4"] == "no such file"
    assert "not a readable video" in reasons["text.mp4"] and "not a readable video" in reasons["cut.mp4"]
    assert reasons["cut_faststart.mp4"].startswith("truncated: the container lists 40 frames")
    assert reasons["empty.mp4"] in ("no video stream", "no video frames")  # FFmpeg drops a stream without data
    assert reasons["good.mp4"] is None and lines[-1]["top"]


@pytest.mark.parametrize("args,message", [
    (["{run}", "{empty_dir}"], "no video files in this folder"),
    (["{tmp}/no_model", "{clips}"], "no model"),
    (["{run}", "{clips}", "--views", "2x2"], "expected CROPSxCLIPS with 1 or 3 crops"),
])
def test_bad_arguments_are_one_message_and_rc_2(trained, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"run": trained["run"], "empty_dir": tmp_path / "empty", "tmp": tmp_path, "clips": trained["clips"]}
    proc = s4v_cli("predict", *(a.format(**fill) for a in args))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------- load and export
def test_export_from_any_checkpoint_and_load_it_anywhere(trained, tmp_path):
    run = trained["run"]
    final, pre = s4v.load(run)
    assert final.class_names == CLASSES and pre.data.resize_short == 32 and pre.data.num_frames == 4
    from_ckpt, _ = s4v.load(run, tag="step_12")  # the end-of-run checkpoint (ZeRO-3) = the export
    for (k, a), b in zip(final.state_dict().items(), from_ckpt.state_dict().values()):
        assert torch.equal(a, b), k
    proc = s4v_cli("export", str(run), "--tag", "6", "--out", str(tmp_path / "step6.pt"))
    assert proc.returncode == 0 and "step 6" in proc.stdout, proc.stderr[-2000:]
    moved = shutil.copy(tmp_path / "step6.pt", tmp_path / "elsewhere.pt")  # no run directory beside it
    early, early_pre = s4v.load(moved)
    assert early.class_names == CLASSES and early_pre.to_dict() == pre.to_dict()  # both stored in the file
    assert not torch.equal(early.head.fc.weight, final.head.fc.weight)
    ckpt_model, _ = s4v.load(run / "checkpoints" / "step_00000006")
    assert torch.equal(ckpt_model.head.fc.weight, early.head.fc.weight)
    proc = s4v_cli("export", str(run), "--tag", "step_5")
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["s4v_tiny", "s4v_tiny_pe", "s4v_tiny_siglip2", "s4v_tiny_dinov2",
                                  "s4v_tiny_dinov3", "s4v_retrieval_tiny_siglip2"])
def test_default_preprocess_normalises_as_the_tower_was_trained(name, tmp_path):
    """A model with no stored protocol (create_model, or a model file saved without one) is normalised
    with its tower family's mean/std: PE-Core, SigLIP2 and DINO models got CLIP's."""
    from s4v.model.checkpoint_io import save_model
    from s4v.model.towers import family_info

    model, pre = s4v.create_model(name, 3, 4, return_preprocess=True)
    family = family_info(model.spec.backbone.family)
    assert pre.data.mean == pytest.approx(family.mean) and pre.data.std == pytest.approx(family.std)
    save_model(model, tmp_path / "m.pt", include_backbone=True)
    _, loaded = s4v.load(tmp_path / "m.pt")
    assert loaded.to_dict() == pre.to_dict()


def test_retrieval_model_file_keeps_its_test_protocol(tmp_path):
    """The end-of-run retrieval export stored no protocol, so a moved export was read with defaults."""
    from s4v.data.config import DataConfig
    from s4v.infer.preprocess import protocol_dict
    from s4v.model.checkpoint_io import save_model

    model = s4v.create_model("s4v_retrieval_tiny_siglip2", num_frames=4)
    protocol = protocol_dict(DataConfig(num_frames=4, image_size=model.spec.backbone.image_size, resize_short=40,
                                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), test_sampling="linspace"))
    save_model(model, tmp_path / "r.pt", include_backbone=True, preprocess=protocol)
    _, pre = s4v.load(tmp_path / "r.pt")
    assert pre.to_dict() == protocol


def test_predict_files_takes_a_model_made_by_create_model(tmp_path):
    """The Python API: `predict_files` on a fresh `s4v.create_model` model (no class names) raised
    AttributeError; its classes are named by index."""
    import io

    from s4v.infer.predict import predict_files

    path = write_video(tmp_path / "v.mp4", frames=10, height=32, width=40)
    model, pre = s4v.create_model("s4v_tiny", 3, 4, return_preprocess=True)
    out = io.StringIO()
    assert predict_files(model.eval(), pre, [str(path)], out, topk=3, workers=0, progress=False)["num_predicted"] == 1
    assert sorted(name for name, _ in json.loads(out.getvalue())["top"]) == ["0", "1", "2"]
