"""data_prep annotation parsers, each on small hand-made files in the dataset's distributed format."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from data_prep.datasets import AnnotationError, ParseArgs, parse_split
from data_prep.datasets.vatex import split_id


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def by_id(parsed):
    return {r.source_id: r for r in parsed.records}


def test_kinetics(tmp_path):
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    (ann / "train.csv").write_text(header + "zumba,abc_DEF-123,10,20,train,0\n"
                                   "abseiling,xyz,0,10,train,0\n"
                                   "abseiling,gone,5,15,train,0\n")
    (ann / "validate.csv").write_text(header + "zumba,vvv,30,40,val,0\n")
    touch(vids / "zumba" / "abc_DEF-123_000010_000020.mp4")  # trimmed clip in a class folder
    touch(vids / "xyz.mkv")  # the full YouTube video
    touch(vids / "vvv_000030_000040.mp4")
    train = parse_split("kinetics400", ParseArgs(vids, ann, "train"))
    assert train.classes == ["abseiling", "zumba"]
    recs = by_id(train)
    clip = recs["abc_DEF-123_000010_000020"]
    assert clip.path.endswith("zumba/abc_DEF-123_000010_000020.mp4") and clip.start is None
    assert (clip.label, clip.label_index) == ("zumba", 1)
    full = recs["xyz_000000_000010"]
    assert full.path.endswith("xyz.mkv") and (full.start, full.end) == (0.0, 10.0) and full.label_index == 0
    assert recs["gone_000005_000015"].path is None and "not found" in recs["gone_000005_000015"].missing_reason
    val = parse_split("k400", ParseArgs(vids, ann, "val"))
    assert val.classes == train.classes and val.records[0].label_index == 1


def test_kinetics_bad_label_and_missing_file(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (tmp_path / "v").mkdir()
    with pytest.raises(AnnotationError, match=r"train\.csv"):
        parse_split("kinetics400", ParseArgs(tmp_path / "v", ann, "train"))
    (ann / "train.csv").write_text("label,youtube_id,time_start,time_end,split\na,x,0,10,train\n")
    (ann / "validate.csv").write_text("label,youtube_id,time_start,time_end,split\nb,y,0,10,val\n")
    with pytest.raises(AnnotationError, match="not a train class"):
        parse_split("kinetics400", ParseArgs(tmp_path / "v", ann, "val"))
    (ann / "train.csv").write_text("name,url\na,x\n")
    with pytest.raises(AnnotationError, match="youtube_id"):
        parse_split("kinetics400", ParseArgs(tmp_path / "v", ann, "train"))


def test_ssv2(tmp_path):
    ann, vids = tmp_path / "ann", tmp_path / "20bn-something-something-v2"
    ann.mkdir()
    (ann / "labels.json").write_text(json.dumps({"Putting something on a surface": "1",
                                                 "Approaching something with your camera": "0"}))
    (ann / "train.json").write_text(json.dumps([
        {"id": "78687", "label": "putting a cup on a table", "template": "Putting [something] on a surface",
         "placeholders": ["a cup"]},
        {"id": "42326", "label": "approaching a door", "template": "Approaching [something] with your camera",
         "placeholders": ["a door"]},
        {"id": "999", "label": "x", "template": "Putting [something] on a surface", "placeholders": ["x"]}]))
    touch(vids / "78687.webm")
    touch(vids / "42326.webm")
    parsed = parse_split("ssv2", ParseArgs(vids, ann, "train"))
    assert parsed.classes == ["Approaching something with your camera", "Putting something on a surface"]
    recs = by_id(parsed)
    assert recs["78687"].label == "Putting something on a surface" and recs["78687"].label_index == 1
    assert recs["78687"].extra["placeholders"] == ["a cup"] and recs["42326"].label_index == 0
    assert recs["999"].path is None
    with pytest.raises(AnnotationError, match=r"validation\.json"):
        parse_split("ssv2", ParseArgs(vids, ann, "val"))
    (ann / "validation.json").write_text(json.dumps([{"id": "1", "template": "Unknown [thing]", "label": "",
                                                      "placeholders": []}]))
    with pytest.raises(AnnotationError, match="not in labels.json"):
        parse_split("ssv2", ParseArgs(vids, ann, "val"))


def test_ssv1(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "something-something-v1-labels.csv").write_text("Holding something\nTurning something upside down\n")
    (ann / "something-something-v1-train.csv").write_text("100218;Turning something upside down\n"
                                                         "24;Holding something\n7;Holding something\n")
    root = tmp_path / "data" / "20bn-something-something-v1"
    touch(root / "100218" / "00001.jpg")
    touch(root / "24" / "00001.jpg")
    (root / "7").mkdir()  # empty folder
    parsed = parse_split("ssv1", ParseArgs(tmp_path / "data", ann, "train", frames_fps=12))
    recs = by_id(parsed)
    assert parsed.classes == ["Holding something", "Turning something upside down"]
    assert recs["100218"].frames_dir == str(root / "100218") and recs["100218"].label_index == 1
    assert recs["100218"].frame_rate == 12 and recs["24"].label_index == 0
    assert recs["7"].frames_dir is None and "empty" in recs["7"].missing_reason
    # --videos may also point at the 20bn-... folder itself
    assert by_id(parse_split("ssv1", ParseArgs(root, ann, "train")))["24"].frames_dir == str(root / "24")


def test_msrvtt(tmp_path):
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    data = {"videos": [{"video_id": f"video{i}", "split": "train" if i < 2 else "test", "id": i} for i in range(4)],
            "sentences": [{"video_id": "video0", "caption": "a man sings", "sen_id": 0},
                          {"video_id": "video0", "caption": "someone is singing", "sen_id": 1},
                          {"video_id": "video1", "caption": "a cat", "sen_id": 2}]}
    (ann / "MSRVTT_data.json").write_text(json.dumps(data))
    (ann / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\n")
    (ann / "MSRVTT_train.7k.csv").write_text("video_id\nvideo1\n")
    (ann / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n"
                                                 "ret0,msr3,video3,a woman cooks pasta\n")
    for i in range(4):
        touch(vids / ("TrainValVideo" if i < 2 else "TestVideo") / f"video{i}.mp4")
    train = parse_split("msrvtt", ParseArgs(vids, ann, "train"))
    assert train.classes == []
    assert by_id(train)["video0"].captions == ["a man sings", "someone is singing"]
    assert [r.source_id for r in parse_split("msrvtt", ParseArgs(vids, ann, "train7k")).records] == ["video1"]
    test = parse_split("msrvtt", ParseArgs(vids, ann, "test")).records
    assert [(r.source_id, r.captions) for r in test] == [("video3", ["a woman cooks pasta"])]
    assert test[0].path.endswith("TestVideo/video3.mp4")


def test_msvd_pickle_and_txt(tmp_path):
    ann, vids = tmp_path / "ann", tmp_path / "YouTubeClips"
    ann.mkdir()
    caps = {"-4wsuPCjDBc_5_15": [["a", "man", "runs"], ["someone", "runs"]], "ab_c_1_2": [["a", "dog"]]}
    (ann / "raw-captions.pkl").write_bytes(pickle.dumps(caps))
    (ann / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nab_c_1_2 vid2\n")
    (ann / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n")
    (ann / "test_list.txt").write_text("vid2\n")  # split lists may use vidN names
    touch(vids / "-4wsuPCjDBc_5_15.avi")
    touch(vids / "vid2.avi")
    train = parse_split("msvd", ParseArgs(vids, ann, "train")).records
    assert [(r.source_id, r.captions) for r in train] == [("-4wsuPCjDBc_5_15", ["a man runs", "someone runs"])]
    test = parse_split("msvd", ParseArgs(vids, ann, "test")).records
    assert test[0].source_id == "ab_c_1_2" and test[0].path.endswith("vid2.avi") and test[0].captions == ["a dog"]
    # AllVideoDescriptions.txt instead of the pickle
    (ann / "raw-captions.pkl").unlink()
    (ann / "AllVideoDescriptions.txt").write_text("# header\n-4wsuPCjDBc_5_15 a man is running\n"
                                                 "-4wsuPCjDBc_5_15 a person jogs\n")
    train = parse_split("msvd", ParseArgs(vids, ann, "train")).records
    assert train[0].captions == ["a man is running", "a person jogs"]


def test_msvd_refuses_code_in_pickle(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "raw-captions.pkl").write_bytes(pickle.dumps({"x": Path("/etc")}))
    (ann / "youtube_mapping.txt").write_text("x vid1\n")
    (ann / "train_list.txt").write_text("x\n")
    (tmp_path / "v").mkdir()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        parse_split("msvd", ParseArgs(tmp_path / "v", ann, "train"))


def test_vatex(tmp_path):
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    (ann / "vatex_training_v1.0.json").write_text(json.dumps([
        {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["A man plays.", "Someone plays."], "chCap": ["中文"]},
        {"videoID": "full_vid_000003_000013", "enCap": ["A dog."], "chCap": []},
        {"videoID": "nothere_000001_000011", "enCap": ["x"], "chCap": []}]))
    touch(vids / "Ptf_2VRj-V0_000122_000132.mp4")
    touch(vids / "full_vid.webm")
    recs = by_id(parse_split("vatex", ParseArgs(vids, ann, "train")))
    assert recs["Ptf_2VRj-V0_000122_000132"].captions == ["A man plays.", "Someone plays."]
    full = recs["full_vid_000003_000013"]
    assert full.path.endswith("full_vid.webm") and (full.start, full.end) == (3.0, 13.0)
    assert recs["nothere_000001_000011"].path is None
    assert split_id("a_b_000001_000002") == ("a_b", 1.0, 2.0) and split_id("noid") is None


def test_folder(tmp_path):
    vids = tmp_path / "v"
    touch(vids / "run" / "a.mp4")
    touch(vids / "run" / "sub" / "b.webm")
    touch(vids / "jump" / "c.avi")
    touch(vids / "jump" / "notes.txt")
    parsed = parse_split("folder", ParseArgs(vids, None, "train"))
    assert parsed.classes == ["jump", "run"]
    assert sorted((r.source_id, r.label_index) for r in parsed.records) == [("jump/c", 0), ("run/a", 1),
                                                                            ("run/sub/b", 1)]
    (tmp_path / "classes.txt").write_text("run\njump\nswim\n")
    parsed = parse_split("folder", ParseArgs(vids, None, "val", classes_file=tmp_path / "classes.txt"))
    assert parsed.classes == ["run", "jump", "swim"] and by_id(parsed)["jump/c"].label_index == 1


def test_manifest_csv_and_jsonl(tmp_path):
    touch(tmp_path / "clips" / "a.mp4")
    touch(tmp_path / "clips" / "b.mp4")
    (tmp_path / "frames" / "c").mkdir(parents=True)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,captions,start,end,split\n"
                        "clips/a.mp4,cat,a cat|the cat,1.5,3,train\n"
                        "clips/b.mp4,dog,,,,train\n"
                        "clips/b.mp4,dog,,,,val\n"
                        "frames/c,cat,,,,train\n")
    parsed = parse_split("manifest", ParseArgs(None, csv_path, "train"))
    recs = by_id(parsed)
    assert parsed.classes == ["cat", "dog"]
    assert recs["clips/a"].captions == ["a cat", "the cat"] and (recs["clips/a"].start, recs["clips/a"].end) == (1.5, 3)
    assert recs["clips/b"].label_index == 1 and recs["frames/c"].frames_dir == str(tmp_path / "frames" / "c")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "clips/a.mp4", "caption": "one", "id": "A"}) + "\n"
                     + json.dumps({"path": "clips/a.mp4", "captions": ["two"]}) + "\n"
                     + json.dumps({"path": "clips/missing.mp4", "caption": "x"}) + "\n")
    parsed = parse_split("manifest", ParseArgs(None, jsonl, "train"))
    recs = by_id(parsed)
    assert parsed.classes == [] and recs["A"].captions == ["one", "two"] and recs["A"].label_index is None
    assert "not found" in recs["clips/missing"].missing_reason
    with pytest.raises(AnnotationError, match="manifest file"):
        parse_split("manifest", ParseArgs(None, tmp_path / "nope.csv", "train"))


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(AnnotationError, match="unknown dataset"):
        parse_split("ucf", ParseArgs(tmp_path, tmp_path, "train"))
    with pytest.raises(AnnotationError, match="unknown split"):
        parse_split("msrvtt", ParseArgs(tmp_path, tmp_path, "dev"))


def test_manifest_rejects_bad_time_ranges_and_rows_without_label_or_caption(tmp_path):
    """Issue 13, item 3: `start: -1` gave a clip that repeats frame 0; these rows are rejected instead."""
    for name in "abcdefg":
        touch(tmp_path / f"{name}.mp4")
    rows = [{"path": "a.mp4", "label": "x", "start": -1},
            {"path": "b.mp4", "label": "x", "start": -0.5, "end": 0.5},
            {"path": "c.mp4", "label": "x", "start": 2, "end": 2},
            {"path": "d.mp4", "label": "x", "start": "soon"},
            {"path": "e.mp4"},  # neither label nor caption
            {"path": "f.mp4", "caption": "fine", "start": 0.5, "end": 1.5},
            {"path": "g.mp4", "label": "x", "end": float("inf")}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = by_id(parse_split("manifest", ParseArgs(None, tmp_path / "m.jsonl", "train")))
    reasons = {k: r.missing_reason for k, r in recs.items()}
    assert reasons == {"a": "bad time range: start -1 s is negative",
                       "b": "bad time range: start -0.5 s is negative",
                       "c": "bad time range: end 2 s is not after start 2 s",
                       "d": "bad time range: start 'soon' is not a number",
                       "e": "no label and no caption in the manifest",
                       "f": "",
                       "g": "bad time range: end inf is not a finite number"}


def test_folder_same_stem_files_are_both_kept_and_empty_classes_warn(tmp_path):
    """Issue 13, item 10: `clip.avi` and `clip.mkv` are two videos, not a duplicate."""
    vids = tmp_path / "v"
    touch(vids / "run" / "clip.avi")
    touch(vids / "run" / "clip.mkv")
    touch(vids / "run" / "other.mp4")
    touch(vids / "run" / "sub" / "clip.mp4")  # another folder: no clash
    (vids / "swim").mkdir()
    touch(vids / "jump" / "notes.txt")
    parsed = parse_split("folder", ParseArgs(vids, None, "train"))
    assert sorted(r.source_id for r in parsed.records) == ["run/clip.avi", "run/clip.mkv", "run/other",
                                                           "run/sub/clip"]
    assert any("2 class folder(s)" in w and "['jump', 'swim']" in w for w in parsed.warnings)
    assert any("--classes not given" in w for w in parsed.warnings)
    (tmp_path / "classes.txt").write_text("run\njump\nswim\n")
    parsed = parse_split("folder", ParseArgs(vids, None, "train", classes_file=tmp_path / "classes.txt"))
    assert not any("--classes not given" in w for w in parsed.warnings)


def test_manifest_segments_of_one_video_are_samples_of_their_own(tmp_path):
    """Rows naming one video with other time ranges (or other ids) were merged into its first row: the
    later segments, and a class only they had, vanished without a count."""
    touch(tmp_path / "long.mp4")
    touch(tmp_path / "b.mp4")
    rows = [{"path": "long.mp4", "start": 0, "end": 1, "label": "walk"},
            {"path": "long.mp4", "start": 1, "end": 2, "label": "run"},
            {"path": "long.mp4", "start": 1, "end": 2, "caption": "a second caption"},  # same segment
            {"path": "long.mp4", "id": "x1", "start": 2, "end": 3, "label": "jump"},  # one range, two ids
            {"path": "long.mp4", "id": "x2", "start": 2, "end": 3, "label": "walk"},
            {"path": "b.mp4", "label": "walk"},
            {"path": "b.mp4", "label": "run"}]  # one clip, two labels: rejected, not silently relabelled
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed = parse_split("manifest", ParseArgs(None, tmp_path / "m.jsonl", "train"))
    recs = by_id(parsed)
    assert sorted(recs) == ["b", "long@0-1", "long@1-2", "x1", "x2"]
    assert parsed.classes == ["jump", "run", "walk"]
    assert (recs["long@1-2"].label, recs["long@1-2"].captions, recs["long@1-2"].start) == ("run", ["a second caption"], 1)
    assert (recs["x1"].label, recs["x2"].label, recs["long@0-1"].label) == ("jump", "walk", "walk")
    assert recs["b"].missing_reason == "rows of one clip give it labels 'walk' and 'run'"
    assert not any(recs[k].missing_reason for k in ("long@0-1", "long@1-2", "x1", "x2"))


def test_manifest_rows_of_one_sample_merge_whatever_their_order(tmp_path):
    """Rows of one id (the range on one row, captions on others) are one sample; a missing start is 0;
    caption rows without id or range join their path's only segment; ambiguous rows and two ranges for
    one id are rejected with their reason; several ids on one clip warn."""
    for name in "abcdef":
        touch(tmp_path / f"{name}.mp4")
    rows = [{"path": "a.mp4", "id": "v1", "start": 3, "end": 13, "caption": "c1"},
            {"path": "a.mp4", "id": "v1", "caption": "c2"},
            {"path": "b.mp4", "start": 2.5, "end": 9, "caption": "d1"},
            {"path": "b.mp4", "caption": "d2"},  # no id, no range: b's only sample
            {"path": "c.mp4", "end": 5, "caption": "e1"},
            {"path": "c.mp4", "start": 0, "end": 5, "caption": "e2"},  # the same clip as the row above
            {"path": "d.mp4", "start": 0, "end": 1, "label": "x"},
            {"path": "d.mp4", "start": 1, "end": 2, "label": "x"},
            {"path": "d.mp4", "caption": "which one?"},
            {"path": "e.mp4", "id": "w", "start": 0, "end": 1, "label": "x"},
            {"path": "e.mp4", "id": "w", "start": 1, "end": 2, "label": "x"},
            {"path": "f.mp4", "id": "s1", "caption": "one"},
            {"path": "f.mp4", "id": "s2", "caption": "two"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed = parse_split("manifest", ParseArgs(None, tmp_path / "m.jsonl", "train"))
    recs = by_id(parsed)
    assert (recs["v1"].captions, recs["v1"].start, recs["v1"].end) == (["c1", "c2"], 3, 13)
    assert recs["b"].captions == ["d1", "d2"] and recs["b"].start == 2.5
    assert recs["c"].captions == ["e1", "e2"]
    assert sorted(k for k in recs if k.startswith("d")) == ["d#row9", "d@0-1", "d@1-2"]
    assert recs["d#row9"].missing_reason.startswith("row 9 gives neither an id nor a time range, and d.mp4 has 2")
    assert recs["w"].missing_reason == "rows of one sample give it two time ranges: 0-1 and 1-2 s"
    assert recs["s1"].captions == ["one"] and recs["s2"].captions == ["two"]
    assert any("listed under several ids with the same time range (e.g. f.mp4: s1, s2)" in w for w in parsed.warnings)
    assert {k: recs[k].missing_reason for k in ("v1", "b", "c", "d@0-1", "d@1-2", "s1", "s2") if recs[k].missing_reason} == {}
