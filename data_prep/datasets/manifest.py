"""Your own data as a manifest: a CSV (with a header) or a JSONL file, passed as `--annotations`.

Fields: `path` (required; a video file or a folder of frames, relative to `--videos` or, if that
is not given, to the manifest's folder), and any of `id`, `label`, `caption` / `captions`
(JSONL: a list; CSV: `|`-separated), `start`, `end` (seconds), `split`. Rows with a `split` field
are kept only if it equals `--split`. A sample is a path and a time range: rows that repeat both (and
do not name different `id`s) add their captions to it; rows of one path with other ranges (segments of
a long video) or other ids are samples of their own (segments without an `id` are keyed
`<path>@<start>-<end>`). Classes are the sorted label names, or the lines of `--classes FILE`.

Rejected (listed in the rejects with the reason, counted): a time range that is not a number, starts
before 0 or ends at or before its start (one that runs past the video is rejected when transcoding),
a sample with neither a label nor a caption, and one whose rows give it different labels.
"""
from __future__ import annotations

import csv
import json
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


def parse(args: ParseArgs) -> ParsedSplit:
    if args.annotations is None or not Path(args.annotations).is_file():
        raise AnnotationError(f"--annotations must be the manifest file (CSV with a header or JSONL with "
                              f"path, label or captions); got {args.annotations}")
    path = Path(args.annotations)
    base = Path(args.videos) if args.videos else path.parent
    samples: dict[tuple, list[VideoRecord]] = {}  # (path, start, end) -> its samples (ids that differ)
    for n, row in enumerate(read_rows(path), 1):
        if not isinstance(row, dict) or not row.get("path"):
            raise AnnotationError(f"{path}: row {n} has no `path` field")
        if row.get("split") and row["split"] != args.split:
            continue
        caps = row.get("captions") or []
        caps = [caps] if isinstance(caps, str) else list(caps)
        if row.get("caption"):
            caps.append(str(row["caption"]))
        (start, bad_start), (end, bad_end) = _seconds(row, "start"), _seconds(row, "end")
        row_id = str(row["id"]) if row.get("id") not in (None, "") else None
        label = str(row["label"]) if row.get("label") not in (None, "") else None
        same_span = samples.setdefault((row["path"], start, end, bad_start, bad_end), [])
        rec = next((r for r in same_span if row_id is None or r.extra.get("id") in (None, row_id)), None)
        if rec is None:
            src = base / row["path"]
            rec = VideoRecord(source_id=row_id or Path(row["path"]).with_suffix("").as_posix(), label=label,
                              start=start, end=end, extra={"id": row_id, "manifest_path": row["path"]})
            problem = bad_start or bad_end or time_range_problem(start, end)
            if problem:
                rec.missing_reason = problem
            elif src.is_dir():
                rec.frames_dir, rec.frame_rate = str(src), args.frames_fps
            elif src.is_file():
                rec.path = str(src)
            else:
                rec.missing_reason = f"video not found: {src}"
            same_span.append(rec)
        elif row_id is not None and rec.extra.get("id") is None:
            rec.source_id, rec.extra["id"] = row_id, row_id
        if label is not None and rec.label not in (None, label):
            rec.missing_reason = rec.missing_reason or f"rows of one clip give it labels {rec.label!r} and {label!r}"
        rec.label = rec.label or label
        rec.captions.extend(caps)
    records = [r for recs in samples.values() for r in recs]
    _key_segments(records)
    for r in records:
        r.extra = {}
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
    warnings = []
    if labels and args.classes_file is None:
        warnings.append(f"--classes not given: the class list is the {len(labels)} sorted labels of split "
                        f"{args.split!r}; pass the same --classes FILE to every split so class indices agree")
    return ParsedSplit("manifest", args.split, classes, records, warnings)


def _key_segments(records: list[VideoRecord]) -> None:
    """Samples of one path without an `id` (segments of a long video) are keyed `<path>@<start>-<end>`
    when the path has more than one sample; a path's only sample keeps the plain key."""
    per_path: dict[str, list[VideoRecord]] = {}
    for r in records:
        per_path.setdefault(r.extra["manifest_path"], []).append(r)
    for recs in per_path.values():
        if len(recs) > 1:
            for r in recs:
                if r.extra["id"] is None:
                    r.source_id = f"{r.source_id}@{_fmt(r.start, '0')}-{_fmt(r.end, 'end')}"


def _fmt(seconds: Optional[float], default: str) -> str:
    return default if seconds is None else f"{seconds:g}"
