"""`s4v eval PATH [CONFIG.yaml] [key=value ...]`: multi-view evaluation of a trained model.

PATH is a run directory (its `config.yaml` and exported `model_side_head.pt` are used) or an s4v
model file (then CONFIG or `data.*` overrides say where the data is). Runs on one process or under
torchrun / srun, with the evaluation split divided over ranks.

Recognition models report top-1/top-5/mean class accuracy; retrieval models (a `task: retrieval` run or
an s4v retrieval model file) report text-to-video and video-to-text R@1/5/10, median and mean rank.
Every report counts the videos of the split (`num_samples`), those scored (`num_evaluated`) and
those that could not be read (`num_unreadable`, first keys with reasons); more unreadable videos
than `eval.max_skip_fraction` (default 0.01) fail the evaluation (exit 1). A run directory gets
`eval.json` and the numbers in its TensorBoard (`tensorboard/eval`).

Exit codes: 0 done, 1 too many unreadable videos, 2 bad input (config, data, weights file).
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
    from s4v.model.weights_file import WeightsFileError

    target = Path(argv[0])
    try:
        cfg, model_file = load_eval_config(target, argv[1:])
    except (ConfigError, FileNotFoundError) as err:
        return _fail(err)

    from s4v.eval.skips import EvalSkipError
    from s4v.train.dist import init_distributed

    info = init_distributed(cfg.engine.backend)
    try:
        return _evaluate(cfg, model_file, target, info)
    except (WeightsFileError, FileNotFoundError, ConfigError) as err:  # e.g. not a weights file, wrong model
        return _fail(err)
    except EvalSkipError as err:  # not one video could be read
        print(f"s4v eval: failed: {err}", file=sys.stderr)
        return 1


def _fail(err: BaseException) -> int:
    print(f"s4v eval: error: {err}", file=sys.stderr)
    return 2


def load_eval_config(target: Path, rest: list[str]):
    """(experiment config, model file) of `s4v eval TARGET [CONFIG] [key=value ...]`. A run directory's
    relative paths (older runs stored them as given) are resolved against its launch directory."""
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment
    from s4v.train.run_dir import latest_config, launch_dir, with_absolute_paths

    config = rest.pop(0) if rest and "=" not in rest[0] else None
    run_dir = target if target.is_dir() else None
    model_file = target / "model_side_head.pt" if run_dir else target
    if run_dir and not (run_dir / "config.yaml").is_file() and config is None:
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass a model file and a config")
    if not model_file.is_file():
        raise FileNotFoundError(f"no model file {model_file} (train with train.export=true, or pass a model file)")
    cfg = load_experiment(config or (str(latest_config(run_dir)) if run_dir else None), rest)
    if run_dir and config is None:
        base = launch_dir(run_dir)
        if base is not None:
            given = tuple(o.partition("=")[0].strip() for o in rest)
            cfg = with_absolute_paths(cfg, base, skip=given)
    _check_data(cfg, run_dir)
    _check_classes(cfg, model_file)
    return cfg, model_file


def _check_classes(cfg, model_file: Path) -> None:
    """A ConfigError when the split's labels do not mean the model's classes (s4v.data.classes): read
    from the model file's header, before any model is built."""
    from s4v.config import ConfigError
    from s4v.data.classes import model_class_problem
    from s4v.data.format import SplitIndex
    from s4v.model.checkpoint_io import model_file_classes

    names, count = model_file_classes(model_file)
    if count is None:  # a retrieval model, or not a model file (reported when it is loaded)
        return
    split = cfg.data.val_split
    problem = model_class_problem(names, count, SplitIndex.load(cfg.data.root, split).classes, split, str(model_file))
    if problem:
        raise ConfigError(problem)


def _check_data(cfg, run_dir: Optional[Path]) -> None:
    """The evaluation split exists, with a message that says which key to set if not."""
    from s4v.config import ConfigError
    from s4v.data.format import INDEX_NAME

    root = cfg.data.root
    hint = (" (the path of the run's config.yaml; pass data.root=... to evaluate from another copy)"
            if run_dir else " (set data.root=... or pass the experiment's CONFIG.yaml)")
    if not root or not Path(root).is_dir():
        raise ConfigError(f"data.root: no folder {root!r}{hint}")
    index = Path(root) / INDEX_NAME.format(split=cfg.data.val_split)
    if not index.is_file():
        raise ConfigError(f"data.val_split: no split index {index} (split {cfg.data.val_split!r}; create it "
                          "with `python -m data_prep.shard`, or set data.val_split=...)")
    import torch

    from s4v.data.split_checks import check_splits

    _, problems = check_splits(cfg.data, [cfg.data.val_split], cuda=torch.cuda.is_available())  # shards, codec
    if problems:
        raise ConfigError("cannot start:\n  - " + "\n  - ".join(problems))


def _evaluate(cfg, model_file: Path, target: Path, info) -> int:
    from s4v.model.retrieval import is_retrieval_file

    if cfg.task == "retrieval" or is_retrieval_file(model_file):
        report, line, extra = _eval_retrieval(cfg, model_file, info)
    else:
        report, line, extra = _eval_recognition(cfg, model_file, info)
    return _finish(cfg, report, line, {**extra, "model": str(model_file), "split": cfg.data.val_split}, target, info)


def _eval_recognition(cfg, model_file: Path, info):
    from s4v.eval.evaluate import evaluate
    from s4v.model.checkpoint_io import load_model

    model = load_model(model_file, pretrained=cfg.model.pretrained, device=info.device,
                       backbone_dtype=cfg.model.backbone_dtype)
    with _autocast(info):
        report = evaluate(model, _val_loader(cfg, info), model.num_classes, info.device, progress=info.is_main)
    views = f"{cfg.data.test_crops} crops x {cfg.data.test_clips} clips"
    line = f"top1 {report['top1']:.4f}  top5 {report['top5']:.4f}  mean-class {report['mean_class_acc']:.4f}"
    summary = {k: report[k] for k in ("top1", "top5", "mean_class_acc")}
    return report, f"{line}  ({_counts(report)}, {views})", {**summary, "views": views}


def _eval_retrieval(cfg, model_file: Path, info):
    from s4v.data.captions import CaptionBank
    from s4v.eval.retrieval import evaluate_retrieval
    from s4v.model.retrieval import load_retrieval_model, tokenize_for

    model = load_retrieval_model(model_file, pretrained=cfg.model.pretrained, device=info.device,
                                 backbone_dtype=cfg.model.backbone_dtype)
    loader = _val_loader(cfg, info)
    captions = CaptionBank.load(cfg.data.root, cfg.data.val_split)
    max_words = cfg.retrieval.max_words

    def encode_video(video):
        return model.prepare_video(model.encode_video(video))

    def encode_texts(texts):
        ids = tokenize_for(model.spec, texts, max_words).to(info.device)  # the model's own tokenizer
        return model.prepare_text(model.encode_text(ids)[0], ids)

    with _autocast(info):
        report = evaluate_retrieval(encode_video, encode_texts, loader, captions, info.device,
                                    progress=info.is_main, ties=cfg.retrieval.eval_ties,
                                    block=cfg.retrieval.eval_block)
    metrics = {k: report[k] for k in report if k.startswith(("t2v_", "v2t_"))}
    line = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    return report, f"{line}  ({report['num_texts']} texts, {_counts(report)})", \
        {**metrics, "num_texts": report["num_texts"], "num_videos": report["num_videos"],
         "ties": cfg.retrieval.eval_ties}


def _counts(report: dict) -> str:
    if not report["num_unreadable"]:
        return f"{report['num_samples']} videos"
    return (f"{report['num_evaluated']} of {report['num_samples']} videos; {report['num_unreadable']} "
            f"unreadable, not counted")


def _finish(cfg, report: dict, line: str, summary: dict, target: Path, info) -> int:
    """Print, write eval.json / TensorBoard (rank 0) and apply eval.max_skip_fraction (every rank)."""
    from s4v.eval.skips import EvalSkipError, check_skip_fraction, describe_unreadable

    summary.update({k: report[k] for k in ("num_samples", "num_evaluated", "num_unreadable", "unreadable")})
    error = None
    try:
        check_skip_fraction(report, cfg.eval.max_skip_fraction)
    except EvalSkipError as err:
        error = str(err)
        summary["error"] = error
    if info.is_main:
        print(line)
        if report["num_unreadable"] and error is None:
            print(f"unreadable: {describe_unreadable(report)}")
        if target.is_dir():
            _write_tensorboard(target, summary)
        _write_summary(target, summary)
        if error:
            print(f"s4v eval: failed: {error}", file=sys.stderr)
    return 1 if error else 0


def _val_loader(cfg, info):
    from s4v.config import ConfigError
    from s4v.data.loader import build_loader

    try:
        return build_loader(cfg.data, cfg.data.val_split, train=False, rank=info.rank,
                            world_size=info.world_size, device=info.device.type)
    except ValueError as err:  # an empty split, too few shards for the readers: the data, not a bug
        raise ConfigError(f"data: {err}") from err


def _autocast(info):
    """bf16 autocast on a GPU, nothing on the CPU."""
    import contextlib

    import torch

    if info.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _write_tensorboard(run_dir: Path, summary: dict) -> None:
    """The numbers under `eval/` in the run's TensorBoard (`tensorboard/eval`), unreadable keys as text."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard" / "eval")) as writer:
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"eval/{key}", value, 0)
        if summary["unreadable"]:
            writer.add_text("eval/unreadable", "\n".join(f"- {u['key']}: {u['reason']}"
                                                         for u in summary["unreadable"]), 0)


def _write_summary(target: Path, summary: dict) -> None:
    """`eval.json` in a run directory (atomically), and the RESULT_JSON line scripts read."""
    if target.is_dir():
        from s4v.fileio import atomic_write_bytes

        atomic_write_bytes(target / "eval.json", json.dumps(summary, indent=1).encode())
    print("RESULT_JSON " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
