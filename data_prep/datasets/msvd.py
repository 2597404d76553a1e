"""MSVD retrieval: captions from `raw-captions.pkl` (CLIP4Clip) or `AllVideoDescriptions.txt`,
the name map `youtube_mapping.txt` (`youtubename vidN` lines) and `{train,val,test}_list.txt`.

Split lists may name videos either way (`-4wsuPCjDBc_5_15` or `vid1`); the source id is always the
YouTube name. Video files may be named either way too (`{youtubename}.avi` or `vidN.*`).
"""
from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path

from data_prep.datasets.common import AnnotationError, ParseArgs, find_file, index_videos, missing, read_lines
from data_prep.records import ParsedSplit, VideoRecord

SPLIT_FILES = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}


class _SafeUnpickler(pickle.Unpickler):
    """raw-captions.pkl holds only dicts, lists and strings: refuse anything else."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a caption pickle")


def load_captions(annotations: Path | None) -> dict[str, list[str]]:
    if annotations is None:
        find_file(None, ["raw-captions.pkl", "AllVideoDescriptions.txt"], "MSVD captions")
    folder = Path(annotations)
    if (folder / "raw-captions.pkl").is_file() or folder.name == "raw-captions.pkl":
        path = find_file(folder, ["raw-captions.pkl"], "MSVD captions")
        with open(path, "rb") as f:
            raw = _SafeUnpickler(f).load()
        if not isinstance(raw, dict):
            raise AnnotationError(f"{path}: expected a dict {{video name: [[token, ...], ...]}}")
        return {k: [" ".join(c) if isinstance(c, (list, tuple)) else str(c) for c in v] for k, v in raw.items()}
    path = find_file(folder, ["AllVideoDescriptions.txt"], "MSVD captions (raw-captions.pkl or AllVideoDescriptions.txt)")
    captions: dict[str, list[str]] = defaultdict(list)
    for line in read_lines(path):
        if line.strip() and not line.startswith("#"):
            name, _, caption = line.strip().partition(" ")
            captions[name].append(caption.strip())
    return dict(captions)


def parse(args: ParseArgs) -> ParsedSplit:
    if args.split not in SPLIT_FILES:
        raise AnnotationError(f"msvd: unknown split {args.split!r}; use one of {sorted(SPLIT_FILES)}")
    captions = load_captions(args.annotations)
    mapping_path = find_file(args.annotations, ["youtube_mapping.txt"], "the MSVD name map (`youtubename vidN` lines)")
    yt_to_vid: dict[str, str] = {}
    for n, line in enumerate(read_lines(mapping_path), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise AnnotationError(f"{mapping_path}:{n}: expected `youtubename vidN`, got {line!r}")
            yt_to_vid[parts[0]] = parts[1]
    vid_to_yt = {v: k for k, v in yt_to_vid.items()}
    split_path = find_file(args.annotations, [SPLIT_FILES[args.split]], f"the MSVD {args.split} list")
    videos = index_videos(args.videos)
    records: list[VideoRecord] = []
    for name in (line.strip() for line in read_lines(split_path)):
        if not name:
            continue
        yt = vid_to_yt.get(name, name)
        vid = yt_to_vid.get(yt, name)
        caps = captions.get(yt) or captions.get(vid) or []
        path = videos.get(yt) or videos.get(vid)
        if path:
            records.append(VideoRecord(source_id=yt, path=path, captions=list(caps), extra={"vid": vid}))
        else:
            records.append(missing(yt, f"{yt}.* or {vid}.* below {args.videos}", captions=list(caps)))
    return ParsedSplit("msvd", args.split, [], records)
