"""Issue 15: `s4v extract` (parts + index, resumable, disjoint over ranks) and `s4v search`, on tiny random
models (a recognition and a retrieval one, saved as model files with their towers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import s4v
from s4v.infer.extract import load_index
from s4v.infer.features import video_features
from s4v.model.checkpoint_io import save_model
from s4v.model.retrieval import save_retrieval_model, tokenize
from tests._media_files import write_video
from tests._train_fixtures import REPO, python_cmd

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
FRAMES = (6, 9, 12, 16, 20, 26)  # the videos differ in length, so in the frames sampled


def cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(python_cmd(nproc, "-m", "s4v.cli.main", *args), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    clips = tmp / "clips"
    clips.mkdir()
    for i, n in enumerate(FRAMES):
        write_video(clips / f"v{i}.mp4", frames=n, height=32, width=32 + 8 * i)
    torch.manual_seed(0)
    recog = s4v.create_model("s4v_tiny", 5, 4)
    save_model(recog, tmp / "recog.pt", include_backbone=True)
    retr = s4v.create_model("s4v_retrieval_tiny", num_frames=4)
    save_retrieval_model(retr, tmp / "retr.pt", include_backbone=True)
    return {"tmp": tmp, "clips": clips, "recog": tmp / "recog.pt", "retr": tmp / "retr.pt",
            "files": sorted(str(p) for p in clips.glob("*.mp4"))}


def test_clip_features_are_what_the_classifier_pools(setup):
    model, pre = s4v.load(setup["recog"])
    video = pre(setup["files"][2])
    clip = video_features(model, video, pre.views, "clip")
    assert torch.allclose(model.head.fc(clip), model(video), atol=1e-5)
    assert video_features(model, video, 1, "frame").shape == (1, 4, model.spec.side.width)


def test_extract_resumes_without_duplicates(setup, tmp_path):
    out = tmp_path / "feats"
    args = ("extract", str(setup["recog"]), str(setup["clips"]), "--out", str(out), "--part-size", "2",
            "--level", "frame", "--workers", "0")
    assert cli(*args).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    (out / "part-00001.json").unlink()  # as if killed while writing part 1, before its JSON
    (out / "index.json").unlink()
    proc = cli(*args)
    assert proc.returncode == 0 and "6 of 6 videos" in proc.stderr, proc.stderr[-2000:]
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert {k for k in first if first[k] != again[k]} == {"part-00001.safetensors", "part-00001.json"}  # part 1 only
    index, feats = load_index(out)
    assert [v["path"] for v in index["videos"]] == setup["files"]
    model, pre = s4v.load(setup["recog"])
    direct = video_features(model, pre(setup["files"][3]), 1, "frame")[0]
    assert torch.allclose(feats[3], direct, atol=1e-5)
    proc = cli("extract", str(setup["recog"]), str(setup["clips"]), "--out", str(out), "--level", "clip")
    assert proc.returncode == 2 and "another extraction" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_ranks_cover_every_file_once(setup, tmp_path):
    out = tmp_path / "feats"
    proc = cli("extract", str(setup["recog"]), str(setup["clips"]), "--out", str(out), "--part-size", "1",
               "--workers", "0", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index, feats = load_index(out)
    assert sorted(v["path"] for v in index["videos"]) == setup["files"] and len(feats) == len(FRAMES)


def test_search_by_text_uses_the_models_similarity_and_by_video_finds_itself(setup, tmp_path):
    out = tmp_path / "feats"
    captions = tmp_path / "captions.txt"
    captions.write_text("a grey square\na dark frame\n")
    proc = cli("extract", str(setup["retr"]), str(setup["clips"]), "--out", str(out), "--level", "frame",
               "--texts", str(captions), "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "texts.safetensors").is_file()
    proc = cli("search", str(out), "a grey square", "--topk", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranked = [line.split("\t") for line in proc.stdout.splitlines()]
    model, pre = s4v.load(setup["retr"])
    with torch.no_grad():  # the model's own scores: logits / temperature
        video = torch.cat([pre(f) for f in setup["files"]])
        expected = (model(video, tokenize(["a grey square"])) / model.temperature())[0]
    order = expected.argsort(descending=True).tolist()
    assert [r[2] for r in ranked] == [setup["files"][i] for i in order]
    assert [float(r[1]) for r in ranked] == pytest.approx(expected[order].tolist(), abs=1e-4)
    proc = cli("search", str(out), "--video", setup["files"][4], "--topk", "1")
    assert proc.returncode == 0 and proc.stdout.split("\t")[2].strip() == setup["files"][4], proc.stdout


def test_bad_input_is_one_message(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("extract", str(setup["recog"]), str(tmp_path / "empty"), "--out", str(tmp_path / "f"))
    assert proc.returncode == 2 and "no video files" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("search", str(tmp_path / "f"), "a query")
    assert proc.returncode == 2 and "no index.json" in proc.stderr and "Traceback" not in proc.stderr
