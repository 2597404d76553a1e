"""MSR-VTT retrieval: `MSRVTT_data.json` (captions), the 9k/7k train lists and the 1k-A test list.

Splits: `train` / `train9k` (`MSRVTT_train.9k.csv`), `train7k` (`MSRVTT_train.7k.csv`), `test` /
`test1k` (`MSRVTT_JSFUSION_test.csv`, one sentence per video, the standard 1k-A protocol), and the
official `val` / `test_full` lists from the `split` field of `MSRVTT_data.json`.
Train videos get all their captions. Videos are `{video_id}.mp4` below `--videos`.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from data_prep.datasets.common import AnnotationError, ParseArgs, find_file, index_videos, missing
from data_prep.records import ParsedSplit, VideoRecord

TRAIN_LISTS = {"train": "MSRVTT_train.9k.csv", "train9k": "MSRVTT_train.9k.csv", "train7k": "MSRVTT_train.7k.csv"}
TEST_LIST = "MSRVTT_JSFUSION_test.csv"
OFFICIAL = {"val": "validate", "test_full": "test"}
SPLITS = sorted([*TRAIN_LISTS, "test", "test1k", *OFFICIAL])


def read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
            raise AnnotationError(f"{path}: expected CSV columns {', '.join(columns)}; found {reader.fieldnames}")
        return list(reader)


def load_data(args: ParseArgs) -> dict:
    path = find_file(args.annotations, ["MSRVTT_data.json"], "the MSR-VTT data JSON ({\"videos\", \"sentences\"})")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "sentences" not in data or "videos" not in data:
        raise AnnotationError(f"{path}: expected a JSON object with \"videos\" and \"sentences\" lists")
    return data


def parse(args: ParseArgs) -> ParsedSplit:
    if args.split not in SPLITS:
        raise AnnotationError(f"msrvtt: unknown split {args.split!r}; use one of {SPLITS}")
    captions: dict[str, list[str]] = defaultdict(list)
    if args.split in ("test", "test1k"):
        path = find_file(args.annotations, [TEST_LIST], "the MSR-VTT 1k-A test list (key,vid_key,video_id,sentence)")
        for row in read_csv(path, ("video_id", "sentence")):
            captions[row["video_id"]].append(row["sentence"].strip())
        ids = list(captions)
    else:
        data = load_data(args)
        for s in data["sentences"]:
            captions[s["video_id"]].append(s["caption"].strip())
        if args.split in TRAIN_LISTS:
            path = find_file(args.annotations, [TRAIN_LISTS[args.split]], f"the MSR-VTT {args.split} list (video_id column)")
            ids = [row["video_id"] for row in read_csv(path, ("video_id",))]
        else:
            ids = [v["video_id"] for v in data["videos"] if v.get("split") == OFFICIAL[args.split]]
    videos = index_videos(args.videos)
    records: list[VideoRecord] = []
    for vid in ids:
        if vid in videos:
            records.append(VideoRecord(source_id=vid, path=videos[vid], captions=captions.get(vid, [])))
        else:
            records.append(missing(vid, f"{vid}.mp4 below {args.videos}", captions=captions.get(vid, [])))
    return ParsedSplit("msrvtt", args.split, [], records)
