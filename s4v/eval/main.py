"""`s4v eval PATH [CONFIG.yaml] [key=value ...]`: multi-view evaluation of a trained model.

PATH is a run directory (its `config.yaml` and exported `model_side_head.pt` are used) or an s4v
model file (then CONFIG or `data.*` overrides say where the data is). Runs on one process or under
torchrun / srun, with the evaluation split divided over ranks.

Recognition models report top-1/top-5/mean class accuracy; retrieval models (a `task: retrieval` run or
an s4v retrieval model file) report text-to-video and video-to-text R@1/5/10, median and mean rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

USAGE = "usage: s4v eval RUN_DIR|MODEL.pt [CONFIG.yaml] [key=value ...]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n" + __doc__)
        return 0 if argv else 2
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment

    target = Path(argv[0])
    rest = argv[1:]
    config = rest.pop(0) if rest and "=" not in rest[0] else None
    if target.is_dir():
        config = config or str(target / "config.yaml")
        model_file = target / "model_side_head.pt"
    else:
        model_file = target
    try:
        if not model_file.is_file():
            raise FileNotFoundError(f"no model file {model_file} (train with train.export=true, or pass a "
                                    "model file)")
        cfg = load_experiment(config, rest)
    except (ConfigError, FileNotFoundError) as err:
        print(f"s4v eval: error: {err}", file=sys.stderr)
        return 2

    from s4v.eval.evaluate import evaluate
    from s4v.model.checkpoint_io import load_model
    from s4v.train.dist import init_distributed

    info = init_distributed(cfg.engine.backend)
    from s4v.model.retrieval import is_retrieval_file

    if cfg.task == "retrieval" or is_retrieval_file(model_file):
        return _eval_retrieval(cfg, model_file, target, info)
    model = load_model(model_file, pretrained=cfg.model.pretrained, device=info.device,
                       backbone_dtype=cfg.model.backbone_dtype)
    with _autocast(info):
        report = evaluate(model, _val_loader(cfg, info), model.num_classes, info.device, progress=info.is_main)
    if info.is_main:
        views = f"{cfg.data.test_crops} crops x {cfg.data.test_clips} clips"
        print(f"top1 {report['top1']:.4f}  top5 {report['top5']:.4f}  mean-class {report['mean_class_acc']:.4f}"
              f"  ({report['num_samples']} videos, {views})")
        summary = {k: report[k] for k in ("top1", "top5", "mean_class_acc", "num_samples")}
        summary.update(model=str(model_file), views=views, split=cfg.data.val_split)
        _write_summary(target, summary)
    return 0


def _eval_retrieval(cfg, model_file, target, info) -> int:
    from s4v.data.captions import CaptionBank
    from s4v.eval.retrieval import evaluate_retrieval
    from s4v.model.retrieval import load_retrieval_model, tokenize

    model = load_retrieval_model(model_file, pretrained=cfg.model.pretrained, device=info.device,
                                 backbone_dtype=cfg.model.backbone_dtype)
    loader = _val_loader(cfg, info)
    captions = CaptionBank.load(cfg.data.root, cfg.data.val_split)
    max_words = cfg.retrieval.max_words

    def encode_video(video):
        return model.prepare_video(model.encode_video(video))

    def encode_texts(texts):
        ids = tokenize(texts, max_words).to(info.device)
        return model.prepare_text(model.encode_text(ids)[0], ids)

    with _autocast(info):
        report = evaluate_retrieval(encode_video, encode_texts, loader, captions, info.device,
                                    progress=info.is_main, ties=cfg.retrieval.eval_ties,
                                    block=cfg.retrieval.eval_block)
    if info.is_main:
        line = "  ".join(f"{k} {report[k]:.2f}" for k in report if k.startswith(("t2v_", "v2t_")))
        print(f"{line}  ({report['num_texts']} texts, {report['num_videos']} videos)")
        summary = {k: v for k, v in report.items() if k != "keys"}
        summary.update(model=str(model_file), split=cfg.data.val_split, ties=cfg.retrieval.eval_ties)
        _write_summary(target, summary)
    return 0


def _val_loader(cfg, info):
    from s4v.data.loader import build_loader

    return build_loader(cfg.data, cfg.data.val_split, train=False, rank=info.rank, world_size=info.world_size,
                        device=info.device.type)


def _autocast(info):
    """bf16 autocast on a GPU, nothing on the CPU."""
    import contextlib

    import torch

    if info.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _write_summary(target: Path, summary: dict) -> None:
    """`eval.json` in a run directory (atomically), and the RESULT_JSON line scripts read."""
    if target.is_dir():
        from s4v.fileio import atomic_write_bytes

        atomic_write_bytes(target / "eval.json", json.dumps(summary, indent=1).encode())
    print("RESULT_JSON " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
