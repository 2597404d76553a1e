"""`python -m data_prep.shard`: turn one split of a dataset into s4v shards.

    python -m data_prep.shard --dataset ssv2 --videos DIR --annotations DIR --split train --out DIR

See README.md, section "Preparing datasets (data_prep)", for every dataset's command.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from data_prep.classes import class_list_conflicts
from data_prep.datasets import ALIASES, PARSERS, AnnotationError, ParseArgs, parse_split
from data_prep.staging import JOURNAL, replace_split, staging_dir
from data_prep.transcode import EncodeOptions, Transcoder
from data_prep.writer import Interrupted, ShardOptions, order_records, save_index, write_split
from s4v.data.format import SplitIndex


def parse_size(text: str) -> int:
    """`500M`, `2G`, `1048576` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def slurm_default(name: str, fallback: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else fallback


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted([*PARSERS, *ALIASES]), help="annotation format of the source data")
    p.add_argument("--videos", type=Path, help="folder of source videos (any depth) or frame folders")
    p.add_argument("--annotations", type=Path, help="folder of the dataset's annotation files (manifest: the file)")
    p.add_argument("--split", required=True, help="train, val, test (dataset-specific names, e.g. msrvtt train7k)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the split's shards and index")
    p.add_argument("--classes", type=Path,
                   help="folder/manifest: class list file, one name per line, or a split index (OUT/train-index.json) "
                        "whose class list to reuse; give the same one to every split")
    g = p.add_argument_group("clips")
    g.add_argument("--codec", choices=["h264", "vp9"], default="h264",
                   help="h264 (GPU decoders) or vp9 (also DALI's CPU decoder)")
    g.add_argument("--fps", type=float, help="output frame rate (default: the source rate, rounded)")
    g.add_argument("--frames-fps", type=float, default=12.0, help="rate of frame folders, e.g. SSv1 (default 12)")
    g.add_argument("--short-side", type=int, default=320, help="short side in pixels (0 keeps the source size)")
    g.add_argument("--gop", type=int, default=16, help="keyframe interval in frames (closed GOPs, no B-frames)")
    g.add_argument("--crf", type=int, help="quality (default 23 for h264, 32 for vp9)")
    g.add_argument("--preset", default="fast", help="x264 preset")
    g.add_argument("--max-seconds", type=float, help="keep at most this many seconds of each video")
    g.add_argument("--min-frames", type=int, default=8, help="reject clips with fewer frames")
    s = p.add_argument_group("shards")
    s.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    s.add_argument("--max-shard-bytes", type=parse_size,
                   help="also cap shard size (e.g. 1G); an over-full shard continues in NAME-01.tar, ...")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the sample shuffle (default 0): every split is written in a shuffled order, so a "
                        "split trained on is never class-sorted, whatever its name")
    s.add_argument("--no-shuffle", action="store_true",
                   help="write samples sorted by source id (folder/manifest sources are then class-sorted)")
    s.add_argument("--shuffle-seed", type=int, help=argparse.SUPPRESS)  # older option: shuffle any split with this seed
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    s.add_argument("--num-jobs", type=int, default=slurm_default("SLURM_ARRAY_TASK_COUNT", 1),
                   help="split the work into K disjoint sets of shards (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    s.add_argument("--job-index", type=int,
                   default=slurm_default("SLURM_ARRAY_TASK_ID", 0) - slurm_default("SLURM_ARRAY_TASK_MIN", 0),
                   help="which of the K parts this job writes (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN)")
    s.add_argument("--merge-index", action="store_true",
                   help="only write the split index from the finished parts of a job array")
    s.add_argument("--overwrite", action="store_true",
                   help="replace this split's existing shards (the new split is written aside and replaces the old "
                        "one only once complete)")
    s.add_argument("--limit", type=int, help="only N records, for a trial run (the first N of the shuffled "
                                                   "order: a random sample over the classes)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def shuffle_seed(args: argparse.Namespace) -> Optional[int]:
    if args.shuffle_seed is not None:
        return args.shuffle_seed
    return None if args.no_shuffle else args.seed


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_classes(args: argparse.Namespace, classes: list[str]) -> None:
    """Refuse a class list that differs from another split's in `--out`, unless `--classes` was given."""
    conflicts = class_list_conflicts(args.out, args.split, classes)
    if conflicts and args.classes is None:
        raise AnnotationError(f"split {args.split!r} would get other classes than the splits already in {args.out} "
                              f"({'; '.join(conflicts.values())}); its class indices would mean other classes. "
                              f"Pass the same --classes FILE to every split (e.g. --classes "
                              f"{args.out / next(iter(conflicts))} reuses that split's list); nothing written")
    for conflict in conflicts.values():
        warn(f"--classes {args.classes} differs from another split in {args.out}: {conflict}")


def warn_empty_classes(out: Path, split: str) -> None:
    index = SplitIndex.load(out, split)
    counts = index.class_counts()
    empty = [name for i, name in enumerate(index.classes) if not counts.get(i)]
    if empty:
        warn(f"{len(empty)} of {len(index.classes)} classes have no sample in split {index.split!r} "
             f"(no usable video): {empty[:10]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge_index:
        staged = staging_dir(args.out, args.split)
        try:
            if (staged / JOURNAL / args.split / "plan.json").is_file():  # the parts of an --overwrite array
                save_index(staged, args.split)
                path = replace_split(staged, args.out, args.split)
            else:
                path = save_index(args.out, args.split)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        index = SplitIndex.load(args.out, args.split)
        print(f"{path}: {index.num_samples} samples in {len(index.shards)} shards")
        return 0
    if not args.dataset or (args.videos is None and args.dataset != "manifest"):
        print("error: --dataset and --videos are required (or --merge-index)", file=sys.stderr)
        return 2
    try:
        enc = EncodeOptions(codec=args.codec, fps=args.fps, short_side=args.short_side, gop=args.gop, crf=args.crf,
                            preset=args.preset, max_seconds=args.max_seconds)
        parsed = parse_split(args.dataset, ParseArgs(args.videos, args.annotations, args.split, args.classes,
                                                     args.frames_fps))
        for message in parsed.warnings:
            warn(message)
        check_classes(args, parsed.classes)
        records = order_records(parsed.records, shuffle_seed(args))[:args.limit] if args.limit else parsed.records
        opts = ShardOptions(out=args.out, dataset=parsed.dataset, split=args.split, classes=parsed.classes,
                            codec=args.codec, shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes,
                            min_frames=args.min_frames, workers=args.workers, shuffle_seed=shuffle_seed(args),
                            num_jobs=args.num_jobs, job_index=args.job_index, progress=not args.no_progress,
                            overwrite=args.overwrite, config=asdict(enc))
        summary = write_split(records, Transcoder(enc), opts)
    except (AnnotationError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, Interrupted) else 2
    print(summary.text())
    if summary.index:
        warn_empty_classes(args.out, args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
