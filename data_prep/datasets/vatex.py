"""VATEX retrieval: a JSON list of {"videoID": "ytid_000010_000020", "enCap": [...], "chCap": [...]}.

English captions only. Videos below `--videos` are `{videoID}.*` (trimmed clips) or `{ytid}.*`
(full videos, trimmed here to the start/end seconds encoded in the id).
"""
from __future__ import annotations

import json

from data_prep.datasets.common import AnnotationError, ParseArgs, find_file, index_videos, missing
from data_prep.records import ParsedSplit, VideoRecord

SPLIT_FILES = {"train": ["vatex_training_v1.0.json"], "val": ["vatex_validation_v1.0.json"],
               "test": ["vatex_public_test_english_v1.1.json", "vatex_public_test_english_v1.0.json"]}
SPLIT_FILES["validation"] = SPLIT_FILES["val"]


def split_id(video_id: str) -> tuple[str, float, float] | None:
    """`ytid_000010_000020` -> (ytid, 10.0, 20.0); YouTube ids may contain underscores themselves."""
    parts = video_id.rsplit("_", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], float(parts[1]), float(parts[2])
    return None


def parse(args: ParseArgs) -> ParsedSplit:
    if args.split not in SPLIT_FILES:
        raise AnnotationError(f"vatex: unknown split {args.split!r}; use one of {sorted(SPLIT_FILES)}")
    path = find_file(args.annotations, SPLIT_FILES[args.split], f"the VATEX {args.split} JSON")
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list) or (items and "videoID" not in items[0]):
        raise AnnotationError(f"{path}: expected a JSON list of {{\"videoID\", \"enCap\", \"chCap\"}}")
    videos = index_videos(args.videos)
    records: list[VideoRecord] = []
    for item in items:
        vid, caps = item["videoID"], [c.strip() for c in item.get("enCap", [])]
        parts = split_id(vid)
        if vid in videos:
            records.append(VideoRecord(source_id=vid, path=videos[vid], captions=caps))
        elif parts and parts[0] in videos:
            records.append(VideoRecord(source_id=vid, path=videos[parts[0]], captions=caps,
                                       start=parts[1], end=parts[2]))
        else:
            records.append(missing(vid, f"{vid}.* below {args.videos}", captions=caps))
    return ParsedSplit("vatex", args.split, [], records)
