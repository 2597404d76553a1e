"""Your own data as a manifest: a CSV (with a header) or a JSONL file, passed as `--annotations`.

Fields: `path` (required; a video file or a folder of frames, relative to `--videos` or, if that
is not given, to the manifest's folder), and any of `id`, `label`, `caption` / `captions`
(JSONL: a list; CSV: `|`-separated), `start`, `end` (seconds), `split`. Rows with a `split` field
are kept only if it equals `--split`. Samples: rows with an `id` are the sample (path, id), whatever
their order (its time range from the row that gives one); rows without one are the sample of their path
and time range (a missing start is 0), so segments of a long video are samples of their own, keyed
`<path>@<start>-<end>` when a path has several; a row with neither id nor range adds its captions and
label to its path's only sample (the whole video when it has none). The captions of a sample's rows
add up. Classes are the sorted label names, or the lines of `--classes FILE`.

Rejected (listed in the rejects with the reason, counted): a time range that is not a number, starts
before 0 or ends at or before its start (one that runs past the video is rejected when transcoding),
a sample with neither a label nor a caption, one whose rows give it different labels or different time
ranges, and a row with neither id nor range on a path with several samples (which one is ambiguous).
Several ids on one path and range are kept as samples of their own, with a warning.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from data_prep.datasets.common import AnnotationError, ParseArgs, load_classes_file
from data_prep.records import ParsedSplit, VideoRecord, time_range_problem


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AnnotationError(f"{path}:{n}: not a JSON object per line ({e})") from None
        return rows
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = []
        for row in csv.DictReader(f):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if "captions" in row:
                row["captions"] = [c.strip() for c in row["captions"].split("|") if c.strip()]
            rows.append(row)
        return rows


def _seconds(row: dict[str, Any], name: str) -> tuple[Optional[float], str]:
    """(value, problem) of an optional `start`/`end` field."""
    value = row.get(name)
    if value in (None, ""):
        return None, ""
    try:
        return float(value), ""
    except (TypeError, ValueError):
        return None, f"bad time range: {name} {value!r} is not a number"


@dataclass
class _Row:
    n: int  # line in the manifest (1-based)
    path: str
    id: Optional[str]
    start: Optional[float]
    end: Optional[float]
    bad_range: str  # why start/end are not numbers, or ""
    label: Optional[str]
    captions: list[str]

    @property
    def has_range(self) -> bool:
        return self.start is not None or self.end is not None or bool(self.bad_range)


def _read_manifest_rows(path: Path, split: str) -> list[_Row]:
    out = []
    for n, row in enumerate(read_rows(path), 1):
        if not isinstance(row, dict) or not row.get("path"):
            raise AnnotationError(f"{path}: row {n} has no `path` field")
        if row.get("split") and row["split"] != split:
            continue
        caps = row.get("captions") or []
        caps = [caps] if isinstance(caps, str) else list(caps)
        if row.get("caption"):
            caps.append(str(row["caption"]))
        (start, bad_start), (end, bad_end) = _seconds(row, "start"), _seconds(row, "end")
        out.append(_Row(n, str(row["path"]), str(row["id"]) if row.get("id") not in (None, "") else None,
                        start, end, bad_start or bad_end, str(row["label"]) if row.get("label") not in (None, "") else None,
                        [str(c) for c in caps]))
    return out


def _group_rows(rows: list[_Row]) -> tuple[dict[tuple, list[_Row]], list[_Row], list[str]]:
    """Rows -> samples. A row with an `id` belongs to the sample (path, id); one without, to the sample of
    its path and time range (a missing start is 0); a row with neither id nor range adds to its path's
    only sample (the whole video when the path has none), and is ambiguous when the path has several.
    Returns (sample key -> rows, ambiguous rows, warnings)."""
    groups: dict[tuple, list[_Row]] = {}
    pending: list[_Row] = []
    for row in rows:
        if row.id is not None:
            groups.setdefault(("id", row.path, row.id), []).append(row)
        elif row.has_range:
            groups.setdefault(("span", row.path, row.start or 0.0, row.end, row.bad_range), []).append(row)
        else:
            pending.append(row)
    ambiguous = []
    for row in pending:
        of_path = [k for k in groups if k[1] == row.path]
        if len(of_path) > 1:
            ambiguous.append(row)
        else:
            groups.setdefault(of_path[0] if of_path else ("span", row.path, 0.0, None, ""), []).append(row)
    warnings = []
    spans: dict[tuple, set[str]] = {}
    for key, members in groups.items():
        if key[0] == "id":
            first = next((r for r in members if r.has_range), members[0])
            spans.setdefault((key[1], first.start or 0.0, first.end), set()).add(key[2])
    several = [k for k, ids in spans.items() if len(ids) > 1]
    if several:
        warnings.append(f"{len(several)} clip(s) are listed under several ids with the same time range (e.g. "
                        f"{several[0][0]}: {', '.join(sorted(spans[several[0]])[:3])}): each id is a sample of its "
                        "own; rows of one sample should share one id (or give none) to merge their captions")
    return groups, ambiguous, warnings


def _range_text(start: Optional[float], end: Optional[float]) -> str:
    return f"{_fmt(start, '0')}-{_fmt(end, 'end')}"


def _fmt(seconds: Optional[float], default: str) -> str:
    if seconds is None:
        return default
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


def parse(args: ParseArgs) -> ParsedSplit:
    if args.annotations is None or not Path(args.annotations).is_file():
        raise AnnotationError(f"--annotations must be the manifest file (CSV with a header or JSONL with "
                              f"path, label or captions); got {args.annotations}")
    path = Path(args.annotations)
    base = Path(args.videos) if args.videos else path.parent
    groups, ambiguous, warnings = _group_rows(_read_manifest_rows(path, args.split))
    samples_of_path: dict[str, int] = {}
    for key in groups:
        samples_of_path[key[1]] = samples_of_path.get(key[1], 0) + 1
    records = []
    for key, members in groups.items():
        ranged = [r for r in members if r.has_range]
        first = ranged[0] if ranged else members[0]
        stem = Path(first.path).with_suffix("").as_posix()
        source_id = key[2] if key[0] == "id" else stem
        if key[0] == "span" and samples_of_path[first.path] > 1:  # segments of one video: keyed by their range
            source_id = f"{stem}@{_range_text(first.start, first.end)}"
        labels = list(dict.fromkeys(r.label for r in members if r.label is not None))
        rec = VideoRecord(source_id=source_id, label=labels[0] if labels else None, start=first.start, end=first.end,
                          captions=[c for r in members for c in r.captions])
        other_ranges = ({(r.start or 0.0, r.end, r.bad_range) for r in ranged}
                        - {(first.start or 0.0, first.end, first.bad_range)})
        src = base / first.path
        if first.bad_range or time_range_problem(first.start, first.end):
            rec.missing_reason = first.bad_range or time_range_problem(first.start, first.end)
        elif other_ranges:
            start, end, _ = sorted(other_ranges, key=str)[0]
            rec.missing_reason = (f"rows of one sample give it two time ranges: {_range_text(first.start, first.end)} "
                                  f"and {_range_text(start, end)} s")
        elif len(labels) > 1:
            rec.missing_reason = f"rows of one clip give it labels {labels[0]!r} and {labels[1]!r}"
        elif src.is_dir():
            rec.frames_dir, rec.frame_rate = str(src), args.frames_fps
        elif src.is_file():
            rec.path = str(src)
        else:
            rec.missing_reason = f"video not found: {src}"
        records.append(rec)
    for row in ambiguous:
        records.append(VideoRecord(
            source_id=f"{Path(row.path).with_suffix('').as_posix()}#row{row.n}",
            missing_reason=f"row {row.n} gives neither an id nor a time range, and {row.path} has "
                           f"{samples_of_path[row.path]} samples: give it the id or range of the one it belongs to"))
    for r in records:
        if r.label is None and not r.captions and not r.missing_reason:
            r.missing_reason = "no label and no caption in the manifest"
    labels = sorted({r.label for r in records if r.label is not None})
    classes = load_classes_file(args.classes_file) if args.classes_file else labels
    index = {c: i for i, c in enumerate(classes)}
    for r in records:
        if r.label is not None:
            if r.label not in index:
                raise AnnotationError(f"{path}: label {r.label!r} of {r.source_id} is not in --classes {args.classes_file}")
            r.label_index = index[r.label]
    if labels and args.classes_file is None:
        warnings.append(f"--classes not given: the class list is the {len(labels)} sorted labels of split "
                        f"{args.split!r}; pass the same --classes FILE to every split so class indices agree")
    return ParsedSplit("manifest", args.split, classes, records, warnings)

