"""Your own data as a class-per-folder tree: `--videos DIR/<class name>/<video file>`.

Classes are the sorted subfolder names, or the lines of `--classes FILE` (use the same file for
every split so indices agree). Source ids are `<class>/<file stem>`.
"""
from __future__ import annotations

import os
from pathlib import Path

from data_prep.datasets.common import (VIDEO_EXTENSIONS, AnnotationError, ParseArgs, load_classes_file)
from data_prep.records import ParsedSplit, VideoRecord


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
    for name in subdirs:
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fname in sorted(filenames):
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in VIDEO_EXTENSIONS or fname.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, stem), root)
                records.append(VideoRecord(source_id=rel.replace(os.sep, "/"), path=os.path.join(dirpath, fname),
                                           label=name, label_index=index[name]))
    return ParsedSplit("folder", args.split, classes, records)
