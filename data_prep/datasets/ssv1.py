"""Something-Something V1: frame folders `20bn-something-something-v1/<id>/00001.jpg ...` and CSVs.

`something-something-v1-labels.csv` holds one class name per line (index = line number);
`something-something-v1-{train,validation}.csv` hold `id;label` lines, `-test.csv` just ids.
`--videos` is the `20bn-something-something-v1` folder or the folder that contains it.
"""
from __future__ import annotations

import os
from pathlib import Path

from data_prep.datasets.common import AnnotationError, ParseArgs, find_file, read_lines
from data_prep.records import ParsedSplit, VideoRecord

SPLIT_FILES = {"train": ["something-something-v1-train.csv"],
               "val": ["something-something-v1-validation.csv"],
               "test": ["something-something-v1-test.csv"]}
SPLIT_FILES["validation"] = SPLIT_FILES["val"]
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def frames_root(videos: Path) -> Path:
    inner = Path(videos) / "20bn-something-something-v1"
    root = inner if inner.is_dir() else Path(videos)
    if not root.is_dir():
        raise AnnotationError(f"--videos {videos} is not a folder (expected 20bn-something-something-v1/<id>/00001.jpg)")
    return root


def parse(args: ParseArgs) -> ParsedSplit:
    if args.split not in SPLIT_FILES:
        raise AnnotationError(f"ssv1: unknown split {args.split!r}; use one of {sorted(SPLIT_FILES)}")
    labels_path = find_file(args.annotations, ["something-something-v1-labels.csv"],
                            "the SSv1 class list (one class name per line)")
    classes = [line.strip() for line in read_lines(labels_path) if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    path = find_file(args.annotations, SPLIT_FILES[args.split], f"the SSv1 {args.split} list (id;label lines)")
    root = frames_root(args.videos)
    records: list[VideoRecord] = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        vid, _, label = line.partition(";")
        vid, label = vid.strip(), label.strip() or None
        if label is not None and label not in index:
            raise AnnotationError(f"{path}:{n}: label {label!r} is not in {labels_path.name}")
        folder = root / vid
        rec = VideoRecord(source_id=vid, frame_rate=args.frames_fps, label=label,
                          label_index=index[label] if label is not None else None)
        if folder.is_dir() and any(f.lower().endswith(FRAME_EXTENSIONS) for f in os.listdir(folder)):
            rec.frames_dir = str(folder)
        else:
            rec.missing_reason = f"frame folder not found or empty: {folder}"
        records.append(rec)
    return ParsedSplit("ssv1", args.split, classes, records)
