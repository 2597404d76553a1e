"""Something-Something V2: `labels.json` and `train.json` / `validation.json` / `test.json`.

`labels.json` maps a template ("Putting something on a surface") to its class index as a string.
A split file is a list of {"id", "label", "template", "placeholders"}; the class is the `template`
with "[" and "]" removed. Videos are `{id}.webm` below `--videos`.
"""
from __future__ import annotations

import json

from data_prep.datasets.common import AnnotationError, ParseArgs, find_file, index_videos, missing
from data_prep.records import ParsedSplit, VideoRecord

SPLIT_FILES = {"train": ["train.json", "something-something-v2-train.json"],
               "val": ["validation.json", "something-something-v2-validation.json"],
               "test": ["test.json", "something-something-v2-test.json"]}
SPLIT_FILES["validation"] = SPLIT_FILES["val"]


def template_to_class(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def load_classes(args: ParseArgs) -> list[str]:
    path = find_file(args.annotations, ["labels.json", "something-something-v2-labels.json"],
                     "the SSv2 class map labels.json ({template: index})")
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{template: \"index\"}}")
    classes = [""] * len(mapping)
    for name, idx in mapping.items():
        i = int(idx)
        if not 0 <= i < len(classes) or classes[i]:
            raise AnnotationError(f"{path}: class indices must be 0..{len(classes) - 1}, each once (bad: {idx!r})")
        classes[i] = name
    return classes


def parse(args: ParseArgs) -> ParsedSplit:
    if args.split not in SPLIT_FILES:
        raise AnnotationError(f"ssv2: unknown split {args.split!r}; use one of {sorted(SPLIT_FILES)}")
    classes = load_classes(args)
    index = {c: i for i, c in enumerate(classes)}
    path = find_file(args.annotations, SPLIT_FILES[args.split], f"the SSv2 {args.split} list")
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{\"id\", \"label\", \"template\", \"placeholders\"}}")
    videos = index_videos(args.videos)
    records: list[VideoRecord] = []
    for item in items:
        vid = str(item["id"])
        label = template_to_class(item["template"]) if "template" in item else None
        if label is not None and label not in index:
            raise AnnotationError(f"{path}: template of video {vid} ({label!r}) is not in labels.json")
        fields = dict(label=label, label_index=index[label] if label is not None else None,
                      extra={"placeholders": item.get("placeholders", []), "caption": item.get("label", "")})
        if vid in videos:
            records.append(VideoRecord(source_id=vid, path=videos[vid], **fields))
        else:
            records.append(missing(vid, f"{vid}.webm below {args.videos}", **fields))
    return ParsedSplit("ssv2", args.split, classes, records)
