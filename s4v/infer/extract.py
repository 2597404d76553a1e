"""`s4v extract MODEL VIDEO_OR_DIR... --out DIR [--level clip|frame|tokens] [--texts FILE]`: features of
video files (s4v.infer.features), in safetensors parts plus an index, resumable and distributed.

The sorted file list is cut into parts of `--part-size` videos; part j is done by rank j % world_size
(torchrun: RANK, WORLD_SIZE; srun: SLURM_PROCID, SLURM_NTASKS), so ranks never share a video and together cover every one, for
any number of ranks. Part j is `DIR/part-0000j.safetensors` (one tensor `features`, the videos'
features concatenated along dim 0) and `DIR/part-0000j.json` (per video: path, offset, shape; and the
unreadable videos with their errors), each written aside and renamed into place, the JSON last: a part
with its JSON is finished, and a rerun (after a crash, a preemption, with another number of ranks)
skips it. When every part is finished, `DIR/index.json` lists them all. `--texts FILE` (one caption per
line; retrieval models) writes `DIR/texts.safetensors` (`tokens` [A, L, E], `ids` [A, L]) and `texts.json`.
`DIR/meta.json` records the model, level and file list; rerunning into DIR with other ones is refused.

Exit codes: 0 all videos extracted, 1 some unreadable (listed in the parts' JSON), 2 bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from s4v.fileio import atomic_write_bytes

from .features import LEVELS

FORMAT = "s4v-features"


def part_name(j: int) -> str:
    return f"part-{j:05d}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s4v extract", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run directory, a checkpoint folder or an s4v model file")
    p.add_argument("videos", nargs="+", help="video files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--level", choices=LEVELS, default=None,
                   help="clip, frame or tokens (default: frame for a retrieval model, which `s4v search` needs; "
                        "clip otherwise)")
    p.add_argument("--texts", type=Path, default=None, help="captions, one per line (retrieval models)")
    p.add_argument("--part-size", type=int, default=1000, help="videos per safetensors part (default 1000)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="decoding processes per rank")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--pretrained", default=None, help="the tower's weights file, for exports without it")
    return p


def _meta(args, files: list[str]) -> dict:
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    return {"format": FORMAT, "model": str(Path(args.model).resolve()), "level": args.level,
            "part_size": args.part_size, "num_videos": len(files), "files_sha256": digest,
            "pretrained": str(Path(args.pretrained).resolve()) if args.pretrained else None}


def check_meta(out: Path, meta: dict) -> None:
    """Write `meta.json`, or check that an earlier run into `out` used the same model, level and files."""
    path = out / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in ("model", "level", "part_size", "files_sha256") if old.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{out} holds features of another extraction (different {', '.join(diff)}); "
                             "use another --out, or remove it")
        return
    atomic_write_bytes(path, json.dumps(meta, indent=1).encode())


def write_part(out: Path, j: int, items: list[dict], feats: list[torch.Tensor], level: str) -> None:
    """Tensors first, then the JSON that marks the part finished (both atomically)."""
    from safetensors.torch import save

    videos, offset = [], 0
    for item, f in zip((i for i in items if "error" not in i), feats):
        videos.append({"path": item["path"], "offset": offset, "shape": list(f.shape), "frames": item["frames"]})
        offset += f.shape[0]
    if feats:
        blob = save({"features": torch.cat(feats).contiguous()})
        atomic_write_bytes(out / f"{part_name(j)}.safetensors", blob)
    errors = [{"path": i["path"], "error": i["error"]} for i in items if "error" in i]
    atomic_write_bytes(out / f"{part_name(j)}.json", json.dumps(
        {"part": j, "level": level, "tensors": f"{part_name(j)}.safetensors" if feats else None,
         "videos": videos, "errors": errors}, indent=1).encode())


def extract_part(model, preprocess, files: list[str], level: str, batch_size: int, workers: int, device,
                 bar=None) -> tuple[list[dict], list[torch.Tensor]]:
    from .inputs import batches, read_videos, stack_views
    from .features import video_features
    from .predict import autocast

    items, feats = [], []
    for group in batches(read_videos(files, preprocess, workers), batch_size):
        items += group
        if "error" not in group[0]:
            with autocast(device):
                f = video_features(model, stack_views(group, device), preprocess.views, level).float().cpu()
            feats += list(f)  # one tensor per video: [D], [T, D] or [V, T, N, D]
        if bar is not None:
            bar.update(len(group))
    return items, feats


def write_index(out: Path, num_parts: int) -> Optional[dict]:
    """`index.json` over all parts, once every part is finished (else None)."""
    parts = [out / f"{part_name(j)}.json" for j in range(num_parts)]
    if not all(p.is_file() for p in parts) or not (out / "meta.json").is_file():
        return None
    videos, errors = [], []
    for j, p in enumerate(parts):
        part = json.loads(p.read_text())
        videos += [{**v, "part": part["tensors"]} for v in part["videos"]]
        errors += part["errors"]
    meta = json.loads((out / "meta.json").read_text())
    index = {**meta, "num_parts": num_parts, "videos": videos, "errors": errors}
    atomic_write_bytes(out / "index.json", json.dumps(index, indent=1).encode())
    return index


def _dist() -> tuple[int, int]:
    """(rank, world size) from torchrun's or srun's variables. No process group: ranks share nothing but
    the output folder, and whichever finishes the last part writes the index."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    return int(env.get("SLURM_PROCID", "0")), int(env.get("SLURM_NTASKS", "1"))


def _device(name: Optional[str]) -> torch.device:
    from .predict import pick_device

    if name is None and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))))
    return pick_device(name)


def write_texts(model, path: Path, out: Path) -> int:
    from safetensors.torch import save

    from .features import text_features

    if not hasattr(model, "encode_text"):
        raise ValueError("--texts needs a retrieval model (this one classifies)")
    texts = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise ValueError(f"--texts {path}: no captions in it")
    tokens, ids = text_features(model, texts)
    atomic_write_bytes(out / "texts.safetensors", save({"tokens": tokens.contiguous(), "ids": ids.contiguous()}))
    atomic_write_bytes(out / "texts.json", json.dumps({"texts": texts}, indent=1).encode())
    return len(texts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from s4v.config import ConfigError
    from s4v.model.weights_file import WeightsFileError

    from .inputs import InputError, collect_videos, quiet_ffmpeg
    from .source import ModelSourceError, load

    rank, world = _dist()
    try:
        if args.part_size < 1 or args.batch_size < 1 or args.workers < 0:
            raise ValueError("--part-size and --batch-size must be >= 1, --workers >= 0")
        files = sorted(set(collect_videos(args.videos)))
        device = _device(args.device)
        model, preprocess = load(args.model, args.pretrained, device)
        if args.level is None:  # text search scores a retrieval model's per-frame embeddings
            args.level = "frame" if hasattr(model, "encode_text") else "clip"
        args.out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            check_meta(args.out, _meta(args, files))
            if args.texts:
                print(f"s4v extract: {write_texts(model, args.texts, args.out)} captions -> {args.out}/texts.safetensors",
                      file=sys.stderr)
    except (InputError, ModelSourceError, ConfigError, WeightsFileError, FileNotFoundError, ValueError) as err:
        print(f"s4v extract: error: {err}", file=sys.stderr)
        return 2
    quiet_ffmpeg()
    num_parts = (len(files) + args.part_size - 1) // args.part_size
    mine = [j for j in range(rank, num_parts, world) if not (args.out / f"{part_name(j)}.json").is_file()]
    todo = sum(len(files[j * args.part_size:(j + 1) * args.part_size]) for j in mine)
    bar = tqdm(total=todo, desc=f"extract (rank {rank})" if world > 1 else "extract", unit="video",
               file=sys.stderr, disable=rank != 0 and world > 1)
    for j in mine:
        part_files = files[j * args.part_size:(j + 1) * args.part_size]
        items, feats = extract_part(model, preprocess, part_files, args.level, args.batch_size, args.workers,
                                    device, bar)
        write_part(args.out, j, items, feats, args.level)
    bar.close()
    index = write_index(args.out, num_parts)  # None while other ranks' parts are unfinished
    if index is None:
        print(f"s4v extract: rank {rank} done ({len(mine)} parts); the index is written when every part is",
              file=sys.stderr)
        return 0
    print(f"s4v extract: {len(index['videos'])} of {len(files)} videos -> {args.out}/index.json "
          f"({num_parts} parts, {len(index['errors'])} unreadable)", file=sys.stderr)
    return 1 if index["errors"] else 0


def load_index(out: str | os.PathLike) -> tuple[dict, list[torch.Tensor]]:
    """(index.json, the features of every video in index order: one tensor each)."""
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / "index.json").is_file():
        raise FileNotFoundError(f"{out}: no index.json (not an s4v extract folder, or the extraction is unfinished: "
                                "rerun s4v extract to finish it)")
    index = json.loads((out / "index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    feats = []
    for v in index["videos"]:
        if v["part"] not in tensors:
            tensors[v["part"]] = load_file(str(out / v["part"]))["features"]
        feats.append(tensors[v["part"]][v["offset"]:v["offset"] + v["shape"][0]].reshape(v["shape"]))
    return index, feats


if __name__ == "__main__":
    sys.exit(main())
