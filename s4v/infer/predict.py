"""`s4v predict MODEL VIDEO_OR_DIR... [--topk 5] [--views CROPSxCLIPS] [--out preds.jsonl]`: classify video files.

MODEL is a run directory, a checkpoint folder or a model file (s4v.infer.source). Every file is read
in place (any container or codec FFmpeg decodes; rotation applied, audio ignored), its frames and
crops taken by the model's test protocol (`--views` changes the number of crops and clips), and the
views' softmax scores averaged, as `s4v eval` does. One JSON line per video, in the order given
(folders: their videos, sorted):

    {"path": "a.mp4", "top": [["class", prob], ...], "frames": [[i, ...], ...], "num_frames": 120}
    {"path": "b.mp4", "error": "not a readable video (Invalid data found when processing input)"}

An unreadable file gets its error line and is counted; the run goes on. Exit codes: 0 every video
classified, 1 some could not be read (counted in the summary on stderr), 2 bad input (no such model,
a folder without videos, bad options).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import IO, Optional, Sequence

import torch


def parse_views(text: Optional[str]) -> Optional[tuple[int, int]]:
    """"3x2" -> (3 crops, 2 clips); crops must be 1 or 3, clips >= 1."""
    if text is None:
        return None
    crops, sep, clips = text.lower().partition("x")
    if not sep or not crops.isdigit() or not clips.isdigit() or int(crops) not in (1, 3) or int(clips) < 1:
        raise argparse.ArgumentTypeError(f"--views {text!r}: expected CROPSxCLIPS with 1 or 3 crops, e.g. 3x2")
    return int(crops), int(clips)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s4v predict", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run directory, a checkpoint folder or an s4v model file")
    p.add_argument("videos", nargs="+", help="video files and/or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes per video (default 5)")
    p.add_argument("--views", type=parse_views, default=None,
                   help="test views CROPSxCLIPS, e.g. 3x2 (default: the model's protocol)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON lines here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--pretrained", default=None, help="the tower's weights file, for exports without it")
    return p


def autocast(device: torch.device):
    """bf16 autocast on a GPU (as s4v eval), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    return device


@torch.no_grad()
def class_scores(model, group: list[dict], views: int, device: torch.device) -> torch.Tensor:
    """`[len(group), C]` view-averaged softmax scores (float32, CPU)."""
    from .inputs import stack_views

    with autocast(device):
        logits = model(stack_views(group, device))
    return logits.float().softmax(-1).view(len(group), views, -1).mean(1).cpu()


def prediction_line(item: dict, scores: Optional[torch.Tensor], names: list[str], topk: int) -> dict:
    if scores is None:
        return {"path": item["path"], "error": item["error"]}
    probs, idx = scores.topk(min(topk, scores.numel()))
    return {"path": item["path"], "top": [[names[int(i)], round(float(p), 6)] for p, i in zip(probs, idx)],
            "frames": item["frames"], "num_frames": item["num_frames"]}


def predict_files(model, preprocess, files: list[str], out: IO[str], topk: int = 5, batch_size: int = 8,
                  workers: int = 2, device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """Write one JSON line per file to `out`; returns {"num_videos", "num_predicted", "num_unreadable"}."""
    from tqdm import tqdm

    from .inputs import batches, read_videos

    device = device or torch.device("cpu")
    names = list(getattr(model, "class_names", None) or []) or [str(i) for i in range(model.num_classes)]
    counts = {"num_videos": len(files), "num_predicted": 0, "num_unreadable": 0}
    bar = tqdm(total=len(files), desc="predict", unit="video", disable=not progress, file=sys.stderr)
    for group in batches(read_videos(files, preprocess, workers), batch_size):
        readable = "error" not in group[0]
        scores = class_scores(model, group, preprocess.views, device) if readable else [None]
        for item, s in zip(group, scores):
            out.write(json.dumps(prediction_line(item, s, names, topk)) + "\n")
        counts["num_predicted" if readable else "num_unreadable"] += len(group)
        bar.update(len(group))
        if not readable:
            bar.write(f"s4v predict: cannot read {group[0]['path']}: {group[0]['error']}", file=sys.stderr)
    bar.close()
    out.flush()
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from s4v.config import ConfigError
    from s4v.model.weights_file import WeightsFileError

    from .inputs import InputError, collect_videos, quiet_ffmpeg
    from .source import ModelSourceError, load

    try:
        if args.topk < 1 or args.batch_size < 1 or args.workers < 0:
            raise ValueError("--topk and --batch-size must be >= 1, --workers >= 0")
        files = collect_videos(args.videos)
        device = pick_device(args.device)
        model, preprocess = load(args.model, args.pretrained, device)
        if not hasattr(model, "num_classes"):
            raise ValueError(f"{args.model} is a retrieval model, which has no classes: use s4v extract / s4v search")
    except (InputError, ModelSourceError, ConfigError, WeightsFileError, FileNotFoundError, ValueError) as err:
        print(f"s4v predict: error: {err}", file=sys.stderr)
        return 2
    if args.views:
        preprocess = preprocess.with_views(*args.views)
    quiet_ffmpeg()
    if args.out is None:
        counts = predict_files(model, preprocess, files, sys.stdout, args.topk, args.batch_size, args.workers, device)
    else:
        counts = _predict_to_file(args, model, preprocess, files, device)
    print(f"s4v predict: {counts['num_predicted']} of {counts['num_videos']} videos classified, "
          f"{counts['num_unreadable']} unreadable" + (f"; lines in {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if counts["num_unreadable"] else 0


def _predict_to_file(args, model, preprocess, files, device) -> dict:
    """Lines go to a temporary file beside `--out`, renamed into place when every video is done."""
    import os

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            counts = predict_files(model, preprocess, files, f, args.topk, args.batch_size, args.workers, device)
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return counts


if __name__ == "__main__":
    sys.exit(main())
