"""Split -> shards: planning, parallel resumable writing, rejects, and the split index.

A split's records are ordered (sorted by source id, or shuffled with a seed) and cut into groups of
`shard_size`; group g becomes `{split}-{g:06d}.tar` (+ `-01`, `-02`, ... parts if a byte cap splits
it). Shard content is a deterministic function of the ordered records and the options, so:

- resume: a finished group leaves a journal entry `.s4v-journal/{split}/{g:06d}.json` (written after
  its tars and `.idx` files were renamed into place); a rerun skips groups whose entry matches the
  plan and whose tars have the recorded sizes, and rewrites every other group from scratch;
- job arrays: job I of K writes the groups g with g % K == I; the split index is written by
  `merge_index` (automatically by whichever job finds every group finished);
- `overwrite`: the new split is written aside (`.s4v-staging/{split}/`, resumable the same way) and
  replaces the old one only once it is complete and holds at least one sample (staging.py).

A split without records, or whose every record was rejected, is an `EmptySplitError`: no index is
written, and nothing is replaced.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from s4v.data.format import INDEX_NAME, ClipMeta, ShardInfo, SplitIndex, sample_key
from s4v.fileio import atomic_write, atomic_write_bytes

from data_prep.records import VideoRecord
from data_prep.staging import JOURNAL, replace_split, split_files, staging_dir
from data_prep.tarwriter import TarSampleWriter, member_bytes
from data_prep.transcode import RejectError, probe_clip

REJECTS_NAME = "{split}-rejects.jsonl"
STOP_ENV = "S4V_DATA_PREP_STOP_AFTER"  # testing hook: stop after this many shards were written
MAX_KEY = 80

Producer = Callable[[VideoRecord], bytes]  # record -> finished clip bytes (must be picklable)


class Interrupted(RuntimeError):
    """The run stopped early (STOP_ENV); rerunning resumes it."""


class EmptySplitError(RuntimeError):
    """A split with no sample to write (no records, or every record rejected)."""


@dataclass
class ShardOptions:
    out: Path
    dataset: str
    split: str
    classes: list[str]
    codec: str = "h264"
    shard_size: int = 100
    max_shard_bytes: Optional[int] = None
    min_frames: int = 8
    workers: int = 1
    shuffle_seed: Optional[int] = None
    num_jobs: int = 1
    job_index: int = 0
    progress: bool = True
    overwrite: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # producer settings (part of the plan fingerprint)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if not 0 <= self.job_index < self.num_jobs:
            raise ValueError(f"job index {self.job_index} is not in 0..{self.num_jobs - 1}")


@dataclass
class Summary:
    split: str
    records: int = 0
    shards_total: int = 0  # groups in the whole split
    shards_mine: int = 0  # groups of this job
    shards_skipped: int = 0  # already finished by an earlier run
    shards_written: int = 0
    samples: int = 0  # in this job's finished groups
    rejects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    seconds: float = 0.0
    index: Optional[str] = None  # path of the split index, once every group is done

    def text(self) -> str:
        lines = [f"split {self.split}: {self.samples} samples, {self.rejects} rejected, "
                 f"{self.duration / 3600:.3f} h ({self.duration:.0f} s) of video in {self.shards_mine} shard groups "
                 f"({self.shards_written} written, {self.shards_skipped} already done) in {self.seconds:.1f} s"]
        lines += [f"  rejected ({n}): {reason}" for reason, n in sorted(self.reject_reasons.items(), key=lambda x: -x[1])]
        lines.append(f"  index: {self.index}" if self.index else
                     f"  index not written yet: {self.shards_total} groups in all; run the other jobs or --merge-index")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- plan
def order_records(records: Sequence[VideoRecord], shuffle_seed: Optional[int]) -> list[VideoRecord]:
    ordered = sorted(records, key=lambda r: r.source_id)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    return ordered


def assign_keys(records: Sequence[VideoRecord]) -> list[str]:
    """WebDataset keys, unique per split; a repeated source id is marked for rejection."""
    keys, seen_ids, seen_keys = [], set(), set()
    for r in records:
        if r.source_id in seen_ids:
            r.missing_reason = r.missing_reason or "duplicate source id (listed more than once)"
        seen_ids.add(r.source_id)
        key = sample_key(r.source_id)
        digest = hashlib.sha1(r.source_id.encode()).hexdigest()
        if len(key) > MAX_KEY:
            key = f"{key[:MAX_KEY - 13]}_{digest[:12]}"
        n = 0
        while key in seen_keys:  # e.g. "a.b" and "a_b"
            n += 1
            key = f"{sample_key(r.source_id)[:MAX_KEY - 13]}_{digest[:8]}{n}"
        seen_keys.add(key)
        keys.append(key)
    return keys


def record_spec(record: VideoRecord) -> dict[str, Any]:
    """Everything of a record that a producer may turn into output (e.g. the synthetic clip parameters
    in `extra`); the source's location (`path`, `frames_dir`) is left out, so moved inputs still resume."""
    spec = asdict(record)
    del spec["path"], spec["frames_dir"]
    return spec


def fingerprint(opts: ShardOptions, keys: Sequence[str], records: Sequence[VideoRecord]) -> str:
    items = [[k, record_spec(r)] for k, r in zip(keys, records)]
    spec = [opts.dataset, opts.split, opts.classes, opts.shard_size, opts.max_shard_bytes, opts.min_frames,
            opts.config, items]
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def shard_name(split: str, group: int, part: int = 0) -> str:
    return f"{split}-{group:06d}.tar" if part == 0 else f"{split}-{group:06d}-{part:02d}.tar"


def journal_dir(out: Path, split: str) -> Path:
    return Path(out) / JOURNAL / split


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def group_done(out: Path, split: str, group: int, fp: str) -> Optional[dict]:
    """The journal entry of a finished, intact group, or None."""
    entry = _load_json(journal_dir(out, split) / f"{group:06d}.json")
    if not entry or entry.get("fingerprint") != fp:
        return None
    for s in entry["shards"]:
        tar = Path(out) / s["name"]
        if not tar.is_file() or tar.stat().st_size != s["bytes"] or not tar.with_suffix(".idx").is_file():
            return None
    return entry


# --------------------------------------------------------------------------------------- worker
@dataclass
class GroupTask:
    out: Path
    split: str
    group: int
    keys: list[str]
    records: list[VideoRecord]
    produce: Producer
    min_frames: int
    max_shard_bytes: Optional[int]
    fingerprint: str


_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def _samples(task: GroupTask, rejects: list[dict]) -> Iterator[tuple[str, list[tuple[str, bytes]], ClipMeta, Optional[int]]]:
    for key, rec in zip(task.keys, task.records):
        try:
            data = task.produce(rec)
            probe = probe_clip(data)  # a clip that PyAV cannot decode fully never enters a shard
            if probe.frames < task.min_frames:
                raise RejectError(f"too short: {probe.frames} frames < --min-frames {task.min_frames}")
        except Exception as e:  # noqa: BLE001 - any failure of one input is a reject, never the end of the job
            reason = str(e) if isinstance(e, RejectError) else f"unexpected error: {type(e).__name__}: {e}"
            rejects.append({"source_id": rec.source_id, "key": key, "reason": reason,
                            "path": rec.path or rec.frames_dir})
        else:
            extra = dict(rec.extra)
            if rec.start is not None or rec.end is not None:
                extra["time_range"] = [rec.start, rec.end]
            meta = ClipMeta(source_id=rec.source_id, label=rec.label, fps=probe.fps, frames=probe.frames,
                            duration=round(probe.frames / probe.fps, 6) if probe.fps else 0.0,
                            width=probe.width, height=probe.height, codec=probe.codec,
                            captions=list(rec.captions), extra=extra)
            files = [("mp4", data)]
            if rec.label_index is not None:
                files.append(("cls", str(rec.label_index).encode()))
            files.append(("json", meta.to_json()))
            yield key, files, meta, rec.label_index
        if _progress_queue is not None:
            _progress_queue.put(1)


def write_group(task: GroupTask) -> dict:
    """Write one group's shard(s), then its journal entry. Returns the journal entry."""
    out = Path(task.out)
    stem = f"{task.split}-{task.group:06d}"
    for stale in list(out.glob(f".{stem}*.tmp-*")) + list(out.glob(f"{stem}-[0-9][0-9].*")):
        stale.unlink(missing_ok=True)  # leftovers of an interrupted attempt at this group
    rejects: list[dict] = []
    it = _samples(task, rejects)
    pending = next(it, None)
    shards, part = [], 0
    while pending is not None:
        name = shard_name(task.split, task.group, part)
        stats: dict[str, Any] = {"keys": [], "duration": 0.0, "classes": Counter()}

        def fill(f) -> None:
            nonlocal pending
            writer = TarSampleWriter(f)
            while pending is not None:
                key, files, meta, label_index = pending
                if (task.max_shard_bytes and stats["keys"]
                        and writer.offset + member_bytes(files) + 1024 > task.max_shard_bytes):
                    break  # the rest goes to the next part
                writer.add(key, files)
                stats["keys"].append(key)
                stats["duration"] += meta.duration
                if label_index is not None:
                    stats["classes"][label_index] += 1
                pending = next(it, None)
            writer.close()
            stats["idx"] = writer.index_text()

        tar_path = atomic_write(out / name, fill)
        atomic_write_bytes(tar_path.with_suffix(".idx"), stats["idx"].encode())
        info = ShardInfo(name=name, samples=len(stats["keys"]), duration=round(stats["duration"], 6),
                         class_counts=dict(sorted(stats["classes"].items())),
                         keys_sha1=hashlib.sha1("\n".join(sorted(stats["keys"])).encode()).hexdigest())
        shards.append({**asdict(info), "bytes": tar_path.stat().st_size})
        part += 1
    if not shards:  # every input rejected: no tar (an empty tar would break DALI), still a finished group
        (out / f"{stem}.tar").unlink(missing_ok=True)
        (out / f"{stem}.idx").unlink(missing_ok=True)
    entry = {"group": task.group, "fingerprint": task.fingerprint, "shards": shards, "rejects": rejects}
    atomic_write_bytes(journal_dir(out, task.split) / f"{task.group:06d}.json", json.dumps(entry, indent=1).encode())
    return entry


# ------------------------------------------------------------------------------------------ run
def _plan_path(out: Path, split: str) -> Path:
    return journal_dir(out, split) / "plan.json"


def _clear_split(out: Path, split: str) -> None:
    shutil.rmtree(journal_dir(out, split), ignore_errors=True)
    for path in split_files(out, split) + [Path(out) / INDEX_NAME.format(split=split)]:
        path.unlink(missing_ok=True)


def write_split(records: Sequence[VideoRecord], produce: Producer, opts: ShardOptions) -> Summary:
    """Shard one split (this job's part of it); resumable, see the module docstring."""
    if not records:
        kept = f"; the existing {opts.split!r} shards in {opts.out} are kept" if opts.overwrite else ""
        raise EmptySplitError(f"split {opts.split!r} has no input records: nothing written{kept}")
    if not opts.overwrite:
        return _write_split(records, produce, opts, discard_other_plan=False)
    staged = staging_dir(opts.out, opts.split)
    summary = _write_split(records, produce, replace(opts, out=staged, overwrite=False), discard_other_plan=True)
    if summary.index:
        summary.index = str(replace_split(staged, opts.out, opts.split))
    return summary


def _write_split(records: Sequence[VideoRecord], produce: Producer, opts: ShardOptions,
                 discard_other_plan: bool) -> Summary:
    t0 = time.time()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    ordered = order_records(records, opts.shuffle_seed)
    keys = assign_keys(ordered)
    fp = fingerprint(opts, keys, ordered)
    groups = [(g, range(s, min(s + opts.shard_size, len(ordered))))
              for g, s in enumerate(range(0, len(ordered), opts.shard_size))]
    plan = {"dataset": opts.dataset, "split": opts.split, "classes": opts.classes, "codec": opts.codec,
            "fingerprint": fp, "groups": len(groups), "records": len(ordered), "shard_size": opts.shard_size}
    old = _load_json(_plan_path(out, opts.split))
    if old and old.get("fingerprint") != fp and discard_other_plan:
        _clear_split(out, opts.split)  # an abandoned staging of other records or settings
        old = None
    if old and old.get("fingerprint") != fp:
        raise RuntimeError(f"{out} already holds {opts.split!r} shards made from other records or settings "
                           f"(journal {_plan_path(out, opts.split)}); use another --out, or --overwrite to replace them")
    if old != plan:
        atomic_write_bytes(_plan_path(out, opts.split), json.dumps(plan, indent=1).encode())

    mine = [(g, idx) for g, idx in groups if g % opts.num_jobs == opts.job_index]
    summary = Summary(opts.split, records=len(ordered), shards_total=len(groups), shards_mine=len(mine))
    entries: list[dict] = []
    todo: list[GroupTask] = []
    for g, idx in mine:
        entry = group_done(out, opts.split, g, fp)
        if entry is not None:
            entries.append(entry)
            summary.shards_skipped += 1
        else:
            todo.append(GroupTask(out, opts.split, g, [keys[i] for i in idx], [ordered[i] for i in idx], produce,
                                  opts.min_frames, opts.max_shard_bytes, fp))
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    entries += _run_tasks(todo, opts, stop_after)
    summary.shards_written = len(todo)

    reasons: Counter = Counter()
    for entry in entries:
        summary.samples += sum(s["samples"] for s in entry["shards"])
        summary.duration += sum(s["duration"] for s in entry["shards"])
        summary.rejects += len(entry["rejects"])
        reasons.update(r["reason"].split(":")[0] for r in entry["rejects"])
    summary.reject_reasons = dict(reasons)
    if all(group_done(out, opts.split, g, fp) for g, _ in groups):
        summary.index = str(save_index(out, opts.split))
    summary.seconds = time.time() - t0
    return summary


def _run_tasks(todo: list[GroupTask], opts: ShardOptions, stop_after: int) -> list[dict]:
    from tqdm import tqdm

    entries: list[dict] = []
    bar = tqdm(total=sum(len(t.records) for t in todo), unit="clip", desc=f"{opts.dataset}/{opts.split}",
               disable=not opts.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        if opts.workers <= 1 or len(todo) <= 1:
            for task in todo:
                entries.append(write_group(task))
                bar.update(len(task.records))
                if stop_after and len(entries) >= stop_after:
                    raise Interrupted(f"stopped after {len(entries)} shard groups ({STOP_ENV}); rerun to resume")
            return entries
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(max_workers=min(opts.workers, len(todo)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(queue,)) as pool:
            futures: set[Future] = {pool.submit(write_group, t) for t in todo}
            try:
                while futures:
                    done, futures = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        bar.update(queue.get())
                    for fut in done:
                        entries.append(fut.result())
                    if stop_after and len(entries) >= stop_after:
                        raise Interrupted(f"stopped after {len(entries)} shard groups ({STOP_ENV}); rerun to resume")
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return entries
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------- merge
def save_index(out: str | os.PathLike, split: str) -> Path:
    """Merge and save the split index; an `EmptySplitError` (no index written) if it holds no sample."""
    index = merge_index(out, split)
    if index.num_samples == 0:
        rejects = Path(out) / REJECTS_NAME.format(split=split)
        reasons = Counter(json.loads(line)["reason"].split(":")[0] for line in rejects.read_text().splitlines())
        listed = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(5)) or "none"
        raise EmptySplitError(f"split {split!r}: every input was rejected ({listed}; see {rejects}); no index "
                              "written, nothing replaced")
    return index.save(out)


def merge_index(out: str | os.PathLike, split: str) -> SplitIndex:
    """Collect every group's journal entry into the split index and `{split}-rejects.jsonl`.

    Returns the SplitIndex (not yet saved); raises if any group is unfinished.
    """
    out = Path(out)
    plan = _load_json(_plan_path(out, split))
    if plan is None:
        raise FileNotFoundError(f"no shard plan {_plan_path(out, split)}: run `python -m data_prep.shard` for split "
                                f"{split!r} into {out} first")
    unfinished = [g for g in range(plan["groups"]) if group_done(out, split, g, plan["fingerprint"]) is None]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} of {plan['groups']} shard groups of {split!r} are not finished "
                           f"(e.g. {unfinished[:8]}); run the missing --job-index values (or rerun) first")
    shards, rejects = [], []
    for g in range(plan["groups"]):
        entry = _load_json(journal_dir(out, split) / f"{g:06d}.json")
        for s in entry["shards"]:
            s = {k: v for k, v in s.items() if k != "bytes"}
            s["class_counts"] = {int(k): v for k, v in s["class_counts"].items()}
            shards.append(ShardInfo(**s))
        rejects += entry["rejects"]
    atomic_write_bytes(out / REJECTS_NAME.format(split=split),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    return SplitIndex(plan["dataset"], split, plan["classes"], shards, codec=plan["codec"])
