"""Class lists of the splits in one output folder must agree (names and order).

A split's class list is the `classes` field of its index (`{split}-index.json`), or of the plan of
an unfinished split (`.s4v-journal/{split}/plan.json`). Caption-only splits (an empty list) are not
compared.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from data_prep.staging import JOURNAL
from s4v.data.format import INDEX_NAME


def _classes_of(path: Path) -> Optional[list[str]]:
    try:
        classes = json.loads(path.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return classes if isinstance(classes, list) else None


def other_split_classes(out: Path, split: str) -> dict[str, list[str]]:
    """{file that records it: class list} of every other split in `out` that has one."""
    out, found = Path(out), {}
    for index in sorted(out.glob(INDEX_NAME.format(split="*"))):
        other = index.name[:-len(INDEX_NAME.format(split=""))]
        classes = _classes_of(index)
        if other != split and classes:
            found[index.name] = classes
    for plan in sorted(out.glob(f"{JOURNAL}/*/plan.json")):
        other = plan.parent.name
        classes = _classes_of(plan)
        if other != split and classes and INDEX_NAME.format(split=other) not in found:
            found[str(plan.relative_to(out))] = classes
    return found


def describe_difference(mine: list[str], theirs: list[str]) -> str:
    """Which classes differ between two class lists, in a few words."""
    extra, missing = [c for c in mine if c not in set(theirs)], [c for c in theirs if c not in set(mine)]
    parts = []
    if extra:
        parts.append(f"only in this split: {extra[:10]}")
    if missing:
        parts.append(f"only there: {missing[:10]}")
    if not parts:
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        parts.append(f"same names in another order (class {i} is {mine[i]!r} here, {theirs[i]!r} there)")
    return "; ".join(parts)


def class_list_conflicts(out: Path, split: str, classes: list[str]) -> dict[str, str]:
    """{file: what differs} for every other split in `out` whose class list differs from `classes`."""
    if not classes:
        return {}
    return {name: f"{name} has {len(theirs)} classes, this split {len(classes)}: "
                  f"{describe_difference(classes, theirs)}"
            for name, theirs in other_split_classes(out, split).items() if theirs != classes}
