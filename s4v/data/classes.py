"""Class lists (names in label order) must agree between the splits of a run and with a trained model:
label i of one split has to mean the class that label i means everywhere else."""
from __future__ import annotations

from typing import Optional, Sequence


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def class_list_difference(expected: Sequence[str], got: Sequence[str]) -> Optional[str]:
    """None when the lists are equal; else which classes `got` lacks or adds, and where the label
    order first differs (e.g. "missing 'a'; label 0 is 'b' instead of 'a'")."""
    expected, got = list(expected), list(got)
    if expected == got:
        return None
    parts = []
    missing = [c for c in expected if c not in set(got)]
    extra = [c for c in got if c not in set(expected)]
    if missing:
        parts.append(f"missing {_names(missing)}")
    if extra:
        parts.append(f"extra {_names(extra)}")
    moved = [(i, a, b) for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    if moved:
        i, a, b = moved[0]
        more = f" ({len(moved)} labels differ)" if len(moved) > 1 else ""
        parts.append(f"label {i} is {b!r} instead of {a!r}{more}")
    elif len(expected) != len(got):
        parts.append(f"{len(got)} classes instead of {len(expected)}")
    return "; ".join(parts)


def class_list_problems(lists: dict[str, Sequence[str]], reference: str) -> list[str]:
    """One message per list in `lists` (name -> class names) that differs from `lists[reference]`."""
    problems = []
    for name, names in lists.items():
        diff = None if name == reference else class_list_difference(lists[reference], names)
        if diff:
            problems.append(f"the class list of {name} differs from that of {reference} ({len(lists[reference])} "
                            f"classes): {diff}. Labels would mean different classes; make every split with the "
                            f"same class list (data_prep: the same --classes FILE)")
    return problems


def model_class_problem(model_classes: Optional[Sequence[str]], num_classes: int, split_classes: Sequence[str],
                        split: str, model: str) -> Optional[str]:
    """Why a trained model (its class names if it stores them, else its output count) cannot be scored
    on a split with `split_classes`, or None. A split without a class list is not checked."""
    if not split_classes:
        return None
    if model_classes:
        diff = class_list_difference(model_classes, split_classes)
        if diff:
            return (f"the class list of split {split!r} differs from that of the model {model} "
                    f"({len(model_classes)} classes): {diff}. Its labels would be scored as other classes")
        return None
    if len(split_classes) != num_classes:
        return (f"the model {model} has {num_classes} classes but split {split!r} lists {len(split_classes)}: "
                f"its labels cannot mean the model's classes")
    return None
