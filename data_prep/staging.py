"""`--overwrite` without losing data: a split is written aside, then moved over the old one.

The new split is written into `OUT/.s4v-staging/{split}/` (shards, `.idx`, rejects, journal, index),
resumable like any other. Only once it is complete and non-empty does `replace_split` move it into
`OUT`: the old index goes first (from then on readers see no split, never a mix), then the old files,
then the new files, the new index last. A crash in between leaves the old files in
`OUT/.s4v-staging/.old-{split}-*` and the split without an index: rerunning the command restores a
complete split.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from pathlib import Path

from s4v.data.format import INDEX_NAME

STAGING = ".s4v-staging"
JOURNAL = ".s4v-journal"  # per-split journals of finished shard groups (writer.py)


def staging_dir(out: Path, split: str) -> Path:
    return Path(out) / STAGING / split


def is_shard_file(name: str, split: str) -> bool:
    """`{split}-NNNNNN.tar` / `-NNNNNN-PP.tar` (and `.idx`), not the files of a split named `{split}-1k`."""
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}(-\d{{2}})?\.(tar|idx)", name) is not None


def split_files(folder: Path, split: str) -> list[Path]:
    """A split's shards, `.idx` files and rejects list in `folder` (not its index)."""
    shards = [p for p in Path(folder).glob(f"{split}-*") if is_shard_file(p.name, split)]
    rejects = Path(folder) / f"{split}-rejects.jsonl"
    return sorted(shards + ([rejects] if rejects.exists() else []))


@contextlib.contextmanager
def split_lock(out: Path, split: str):
    """An exclusive lock over replacing `split` in `out` (the tasks of a job array may finish together);
    released when the process ends, whatever the way."""
    (Path(out) / JOURNAL).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / JOURNAL / f"{split}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_split(staged: Path, out: Path, split: str) -> Path:
    """Move the complete split in `staged` over `split` in `out`; returns the new index's path. Under a
    lock: when another task of the job already moved it, there is nothing left to do."""
    with split_lock(out, split):
        index_name = INDEX_NAME.format(split=split)
        if not (staged / index_name).is_file() and (Path(out) / index_name).is_file() and not staged.exists():
            return Path(out) / index_name  # another task of the job array replaced the split already
        return _replace_split(staged, out, split)


def _replace_split(staged: Path, out: Path, split: str) -> Path:
    index_name = INDEX_NAME.format(split=split)
    if not (staged / index_name).is_file():
        raise FileNotFoundError(f"no complete staged split {staged / index_name}")
    trash = Path(out) / STAGING / f".old-{split}-{os.getpid()}"
    trash.mkdir(parents=True, exist_ok=True)
    old = [Path(out) / index_name, *split_files(out, split), Path(out) / JOURNAL / split]
    for path in old:  # the index first: the old split disappears as a whole for readers
        if path.exists():
            os.replace(path, trash / path.name)
    for path in split_files(staged, split):
        os.replace(path, Path(out) / path.name)
    (Path(out) / JOURNAL).mkdir(exist_ok=True)
    os.replace(staged / JOURNAL / split, Path(out) / JOURNAL / split)
    os.replace(staged / index_name, Path(out) / index_name)  # the new split is complete from here on
    shutil.rmtree(trash)
    shutil.rmtree(staged)
    for leftover in (Path(out) / STAGING).glob(f".old-{split}-[0-9]*"):  # of a replacement that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    if not any((Path(out) / STAGING).iterdir()):
        (Path(out) / STAGING).rmdir()
    return Path(out) / index_name
