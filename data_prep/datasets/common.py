"""Helpers shared by the dataset parsers: locating annotation files and indexing video files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from data_prep.records import VideoRecord

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .webm .mkv .avi .mov .m4v .mpg .mpeg .flv .3gp .ogv .wmv .ts .mts".split())


@dataclass
class ParseArgs:
    videos: Path  # folder of videos (or of frame folders)
    annotations: Optional[Path]  # folder of annotation files, or the manifest file
    split: str
    classes_file: Optional[Path] = None  # one class name per line (folder/manifest)
    frames_fps: float = 12.0  # rate of frame folders (SSv1 is 12 fps)


class AnnotationError(ValueError):
    """An annotation file is missing or not in the expected format."""


def find_file(folder: Optional[Path], names: Iterable[str], what: str) -> Path:
    """The first of `names` that exists in `folder` (or `folder` itself if it is such a file)."""
    names = list(names)
    if folder is None:
        raise AnnotationError(f"--annotations is required: expected a folder with {what} ({' or '.join(names)})")
    folder = Path(folder)
    if folder.is_file() and folder.name in names:
        return folder
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise AnnotationError(f"missing annotation file: expected {what} as {' or '.join(str(folder / n) for n in names)}")


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:
        return [line.rstrip("\r\n") for line in f]


def index_videos(root: Path, extensions: frozenset[str] = VIDEO_EXTENSIONS) -> dict[str, str]:
    """Map file stem -> path for every video below `root` (any depth, e.g. per-class subfolders).

    The first path in sorted order wins when two files share a stem, so the result is deterministic.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"--videos {root} is not a folder")
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions and not name.startswith(".") and stem not in found:
                found[stem] = os.path.join(dirpath, name)
    return found


def missing(source_id: str, tried: str, **fields) -> VideoRecord:
    return VideoRecord(source_id=source_id, missing_reason=f"video not found: {tried}", **fields)


def load_classes_file(path: Path) -> list[str]:
    """Class names from a file with one name per line, or from a split index (`OUT/train-index.json`)."""
    if not Path(path).is_file():
        raise AnnotationError(f"--classes {path} does not exist (expected one class name per line)")
    if Path(path).suffix.lower() == ".json":
        try:
            names = json.loads(Path(path).read_text(encoding="utf-8"))["classes"]
        except (ValueError, KeyError, TypeError):
            raise AnnotationError(f"--classes {path}: a .json file must be a split index with a `classes` "
                                  "list (e.g. OUT/train-index.json)") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AnnotationError(f"--classes {path}: `classes` is not a list of names")
    else:
        names = [line.strip() for line in read_lines(Path(path)) if line.strip()]
    if len(set(names)) != len(names):
        raise AnnotationError(f"--classes {path} lists a class twice")
    return names
