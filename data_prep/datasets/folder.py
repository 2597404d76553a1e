"""Your own data as a class-per-folder tree: `--videos DIR/<class name>/<video file>`.

Classes are the sorted subfolder names, or the lines of `--classes FILE` (use the same file for
every split so indices agree; a split index such as `OUT/train-index.json` also works). Source ids
are `<class>/<file stem>`; files of one folder that share a stem (`clip.avi`, `clip.mkv`) keep
their extension (`<class>/clip.avi`) so that both are kept.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from data_prep.datasets.common import (VIDEO_EXTENSIONS, AnnotationError, ParseArgs, load_classes_file)
from data_prep.records import ParsedSplit, VideoRecord


def _videos(folder: Path) -> list[tuple[str, str]]:
    """(stem, or the file name where a folder holds several files of that stem; path) of every video
    below `folder`, in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        names = sorted(f for f in filenames
                       if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS and not f.startswith("."))
        stems = Counter(os.path.splitext(f)[0] for f in names)
        for fname in names:
            stem = os.path.splitext(fname)[0]
            found.append((fname if stems[stem] > 1 else stem, os.path.join(dirpath, fname)))
    return found


def parse(args: ParseArgs) -> ParsedSplit:
    root = Path(args.videos)
    if not root.is_dir():
        raise AnnotationError(f"--videos {root} is not a folder (expected one subfolder per class)")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = load_classes_file(args.classes_file) if args.classes_file else subdirs
    if not classes:
        raise AnnotationError(f"--videos {root} has no class subfolders (expected {root}/<class>/<video>)")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [d for d in subdirs if d not in index]
    if unknown:
        raise AnnotationError(f"subfolders {unknown[:5]} of {root} are not in --classes {args.classes_file}")
    records: list[VideoRecord] = []
    empty = []
    for name in subdirs:
        videos = _videos(root / name)
        if not videos:
            empty.append(name)
        for rel_name, path in videos:
            rel = os.path.join(os.path.relpath(os.path.dirname(path), root), rel_name)
            records.append(VideoRecord(source_id=rel.replace(os.sep, "/"), path=path,
                                       label=name, label_index=index[name]))
    warnings = []
    if args.classes_file is None:
        warnings.append(f"--classes not given: the class list is the {len(classes)} sorted subfolders of {root}; "
                        "pass the same --classes FILE (or the train split's index JSON) to every split so that "
                        "class indices agree")
    if empty:
        warnings.append(f"{len(empty)} class folder(s) of {root} hold no video file: {empty[:10]}")
    return ParsedSplit("folder", args.split, classes, records, warnings)
