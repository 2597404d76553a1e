"""Start-up checks of the splits a run reads, shared by `s4v train` (its preflight) and `s4v eval`.

Only the index files are read (milliseconds): each split's index and every shard it lists exist, the
loader can decode the split's codec on this machine (s4v/data/codecs.py), and all the splits have the
same class list (s4v/data/classes.py). Each problem is one message naming the key or the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from s4v.data.classes import class_list_problems
from s4v.data.codecs import codec_problem, device_problem
from s4v.data.config import DataConfig
from s4v.data.format import INDEX_NAME, SplitIndex


def check_splits(d: DataConfig, splits: Sequence[str], cuda: bool) -> tuple[dict[str, SplitIndex], list[str]]:
    """(index of every split that has a readable one, problems) for the splits a run will read."""
    if not d.root or not Path(d.root).is_dir():
        return {}, [f"data.root: no folder {d.root!r}"]
    indices: dict[str, SplitIndex] = {}
    problems: list[str] = []
    for split in dict.fromkeys(splits):
        path = Path(d.root) / INDEX_NAME.format(split=split)
        try:
            index = SplitIndex.load(d.root, split)
        except FileNotFoundError:
            problems.append(f"data.root: no split index {path} (split {split!r}; create shards with "
                            "`python -m data_prep.shard`)")
            continue
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"data.root: unreadable split index for {split!r}: {err}")
            continue
        indices[split] = index
        missing = [s.name for s in index.shards if not (Path(d.root) / s.name).is_file()]
        if missing:
            problems.append(f"data.root: {len(missing)} of {len(index.shards)} {split!r} shards are missing "
                            f"under {d.root}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    device = device_problem(d.loader, d.device, cuda)
    if device:
        problems.append(device)
    else:
        for split, index in indices.items():
            codec = codec_problem(index.codec, d.loader, d.device,
                                  f"split {split!r} ({Path(d.root) / INDEX_NAME.format(split=split)})")
            if codec:
                problems.append(codec)
    if len(indices) > 1:
        lists = {f"split {split!r}": index.classes for split, index in indices.items()}
        problems += class_list_problems(lists, reference=next(iter(lists)))
    return indices, problems
