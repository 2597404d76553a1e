"""Kinetics-400 CSV annotations (`label,youtube_id,time_start,time_end,split[,is_cc]`).

Videos are found below `--videos` at any depth (per-class subfolders are fine) as
`{youtube_id}_{time_start:06d}_{time_end:06d}.*` (the common trimmed distribution) or as
`{youtube_id}.*` (the full YouTube video, trimmed here to [time_start, time_end)).
Class indices follow the sorted class names of `train.csv` (the usual convention).
"""
from __future__ import annotations

import csv
from pathlib import Path

from data_prep.datasets.common import AnnotationError, ParseArgs, find_file, index_videos, missing
from data_prep.records import ParsedSplit, VideoRecord

SPLIT_FILES = {"train": ["train.csv"], "val": ["validate.csv", "val.csv", "validation.csv"],
               "test": ["test.csv"]}
SPLIT_FILES["validate"] = SPLIT_FILES["validation"] = SPLIT_FILES["val"]
REQUIRED = ("youtube_id", "time_start", "time_end")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and any(c not in rows[0] for c in REQUIRED):
        raise AnnotationError(f"{path}: expected Kinetics CSV columns label,youtube_id,time_start,time_end,split; "
                              f"found {list(rows[0])}")
    return rows


def parse(args: ParseArgs) -> ParsedSplit:
    if args.split not in SPLIT_FILES:
        raise AnnotationError(f"kinetics400: unknown split {args.split!r}; use one of {sorted(SPLIT_FILES)}")
    rows = read_csv(find_file(args.annotations, SPLIT_FILES[args.split], f"the Kinetics-400 {args.split} CSV"))
    train_rows = rows if args.split == "train" else read_csv(
        find_file(args.annotations, SPLIT_FILES["train"], "the Kinetics-400 train CSV (defines the class list)"))
    classes = sorted({r["label"] for r in train_rows if r.get("label")})
    index = {c: i for i, c in enumerate(classes)}
    videos = index_videos(args.videos)
    records: list[VideoRecord] = []
    for r in rows:
        yid, t0, t1 = r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"]))
        label = r.get("label") or None
        if label is not None and label not in index:
            raise AnnotationError(f"kinetics400 {args.split}: label {label!r} of {yid} is not a train class")
        clip = f"{yid}_{t0:06d}_{t1:06d}"
        fields = dict(label=label, label_index=index.get(label) if label else None)
        if clip in videos:
            records.append(VideoRecord(source_id=clip, path=videos[clip], **fields))
        elif yid in videos:  # the full video: trim to the annotated segment
            records.append(VideoRecord(source_id=clip, path=videos[yid], start=float(t0), end=float(t1), **fields))
        else:
            records.append(missing(clip, f"{clip}.* or {yid}.* below {args.videos}", **fields))
    return ParsedSplit("kinetics400", args.split, classes, records)
