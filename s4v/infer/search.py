"""`s4v search INDEX "a dog catches a frisbee" [--topk 10]` / `s4v search INDEX --video FILE`: rank the
videos of an `s4v extract` folder.

Text queries need a retrieval model's features at `--level frame` (the per-frame video embeddings):
the query goes through the model's text tower and is scored against every video with the model's own
similarity (WTI or mean, s4v.model.wti), in blocks. A `--video FILE` query is read and embedded like
the indexed videos and ranked by cosine similarity of the clip vectors (the normalised mean of the
frames; for recognition features, of the pooled side features). The model is the one recorded in the
index (`--model` for another copy of it). Prints `rank score path` lines.

Exit codes: 0 done, 2 bad input (no index, text query without a retrieval index, unreadable query video).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s4v search", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", type=Path, help="an s4v extract output folder")
    p.add_argument("text", nargs="?", default=None, help="the text query")
    p.add_argument("--video", default=None, help="a video file as the query instead")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--model", default=None, help="default: the model recorded in the index")
    p.add_argument("--pretrained", default=None, help="the tower's weights file, for exports without it")
    p.add_argument("--device", default=None)
    return p


def clip_vectors(feats: torch.Tensor, level: str) -> torch.Tensor:
    """`[B, D]` unit vectors from stacked features: clip as is, frame/tokens averaged over all but the last dim."""
    x = feats.float()
    if level != "clip":
        x = F.normalize(x, dim=-1).flatten(1, -2).mean(1)
    return F.normalize(x, dim=-1)


@torch.no_grad()
def text_scores(model, text: str, frames: torch.Tensor, device) -> torch.Tensor:
    """`[B]` the model's text-video similarity of `text` with per-frame video embeddings `frames` [B, T, E]."""
    from s4v.model.wti import score_in_blocks

    from .features import text_features

    tokens, ids = text_features(model, [text])
    t = model.prepare_text(tokens.to(device), ids.to(device))
    v = model.prepare_video(frames.to(device))
    return score_in_blocks(t, v, device=device)[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from s4v.config import ConfigError
    from s4v.model.weights_file import WeightsFileError

    from .extract import load_index
    from .inputs import quiet_ffmpeg
    from .predict import pick_device
    from .source import ModelSourceError, load
    from .video_file import VideoReadError

    quiet_ffmpeg()
    try:
        if (args.text is None) == (args.video is None):
            raise ValueError("give a text query or --video FILE (one of them)")
        index, feats = load_index(args.index)
        if not feats:
            raise ValueError(f"{args.index}: the index holds no video")
        device = pick_device(args.device)
        model, preprocess = load(args.model or index["model"], args.pretrained or index.get("pretrained"), device)
        level, stacked = index["level"], torch.stack(feats)
        if args.text is not None:
            if not hasattr(model, "encode_text") or level != "frame":
                raise ValueError(f"text search needs the frame-level features of a retrieval model; {args.index} "
                                 f"holds {level}-level features of a {'retrieval' if hasattr(model, 'encode_text') else 'recognition'} "
                                 "model (s4v extract RETRIEVAL_MODEL ... --level frame)")
            scores = text_scores(model, args.text, stacked, device)
        else:
            from .features import video_features

            video = preprocess(args.video).to(device)
            query = video_features(model, video, preprocess.views, level).float().cpu()
            scores = clip_vectors(stacked, level) @ clip_vectors(query, level)[0]
    except (ModelSourceError, ConfigError, WeightsFileError, FileNotFoundError, ValueError, VideoReadError) as err:
        print(f"s4v search: error: {err}", file=sys.stderr)
        return 2
    top = scores.topk(min(args.topk, len(scores)))
    for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank}\t{score:.4f}\t{index['videos'][i]['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
