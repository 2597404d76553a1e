"""Videos an evaluation could not read: counted, listed with their reasons, fatal beyond a share.

The loaders skip a video that fails to read or decode (its batch slot is marked invalid), so an
evaluation scores only the videos it could read. Every report therefore says how many videos the
split had (`num_samples`), how many were scored (`num_evaluated`) and how many were not
(`num_unreadable`, with the first keys and reasons in `unreadable`); `check_skip_fraction` fails the
evaluation when more than `eval.max_skip_fraction` of the videos are missing from its numbers.
"""
from __future__ import annotations

from typing import Iterable

from s4v.train.dist import all_gather_object

FIRST = 10  # unreadable keys kept in reports and messages


class EvalSkipError(RuntimeError):
    """Too many videos of an evaluation could not be read for its numbers to stand."""


class SkipCounter:
    """This rank's videos skipped by `loader` from now on (the loader counts over its whole life)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.start = len(getattr(loader, "skipped_keys", ()))

    def local(self) -> list[tuple[str, str]]:
        return list(getattr(self.loader, "skipped_keys", ()))[self.start:]


def gather_unreadable(local: list[tuple[str, str]], scored: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Every rank's (key, reason) pairs, one per key, sorted; keys that were scored elsewhere are dropped."""
    merged: dict[str, str] = {}
    for part in all_gather_object(local):
        for key, reason in part:
            merged.setdefault(key, reason)
    for key in scored:
        merged.pop(key, None)
    return sorted(merged.items())


def skip_fields(num_evaluated: int, unreadable: list[tuple[str, str]]) -> dict:
    """The report fields: `num_samples`, `num_evaluated`, `num_unreadable`, `unreadable` (first keys)."""
    return {"num_samples": num_evaluated + len(unreadable), "num_evaluated": num_evaluated,
            "num_unreadable": len(unreadable),
            "unreadable": [{"key": k, "reason": r} for k, r in unreadable[:FIRST]]}


def describe_unreadable(report: dict) -> str:
    """`KEY (reason), ...` of a report's first unreadable videos."""
    shown = ", ".join(f"{u['key']} ({u['reason']})" for u in report["unreadable"])
    more = report["num_unreadable"] - len(report["unreadable"])
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_skip_fraction(report: dict, max_fraction: float) -> None:
    """EvalSkipError when more than `max_fraction` of the report's videos could not be read."""
    n, bad = report["num_samples"], report["num_unreadable"]
    if bad and bad > max_fraction * n:
        raise EvalSkipError(f"{bad} of {n} evaluation videos could not be read (more than "
                            f"eval.max_skip_fraction={max_fraction:g}); the metrics would cover only "
                            f"{n - bad}. Unreadable: {describe_unreadable(report)}")
