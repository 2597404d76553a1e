"""`s4v export RUN_DIR [--tag step_N] [--out FILE]`: a model file from any checkpoint of a run.

Every checkpoint folder holds `fp32_state.pt` (s4v.train.checkpoint.CONSOLIDATED): the fp32 master
weights and buffers of what the engine trained, by parameter name, whatever the ZeRO stage (1, 2 or
3) and world size. The model is rebuilt from the run's config.yaml as training built it (seeded with
`train.seed`, so a random test tower is the same as long as the run built it on the CPU), the
checkpoint's weights are put in, and it is saved like the end-of-run export, with the class names and
the test protocol (`preprocess`). No DeepSpeed is needed.

Exit codes: 0 written, 2 bad input (not a run directory, no such or a broken checkpoint).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class ExportError(ValueError):
    pass


def choose_checkpoint(run_dir: Path, tag: Optional[str] = None) -> Path:
    """`run_dir/checkpoints/<tag>`, or the newest intact checkpoint (`latest` first); ExportError if none."""
    from s4v.train.checkpoint import complete_tags, latest_tag, verify

    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag is not None:
        digits = tag.removeprefix("step_")
        if digits.isdigit():  # "N", "step_N": the folder name has 8 digits
            tag = f"step_{int(digits):08d}"
        problem = verify(ckpt_dir / tag) if (ckpt_dir / tag).is_dir() else "no such checkpoint"
        if problem:
            have = ", ".join(complete_tags(ckpt_dir)) if ckpt_dir.is_dir() else "none"
            raise ExportError(f"checkpoint {ckpt_dir / tag}: {problem} (checkpoints: {have})")
        return ckpt_dir / tag
    tags = complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    latest = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    for name in ([latest] if latest in tags else []) + tags[::-1]:
        if verify(ckpt_dir / name) is None:
            return ckpt_dir / name
    raise ExportError(f"{run_dir} has no exported model ({run_dir}/model_side_head.pt) and no intact checkpoint")


def _build(cfg, num_classes: Optional[int], pretrained, device) -> nn.Module:
    import s4v

    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # as training built it: a random tower comes out the same
    if cfg.task == "retrieval":
        r = cfg.retrieval
        return s4v.create_model(m.name, num_frames=m.num_frames, pretrained=pretrained, device=device,
                                interaction=r.interaction, freeze_text=r.freeze_text,
                                max_temperature=r.max_temperature, **m.overrides)
    return s4v.create_model(m.name, num_classes, m.num_frames, pretrained=pretrained, device=device, **m.overrides)


def model_from_checkpoint(run_dir: Path, folder: Path, cfg, pretrained=None, device=None,
                          backbone_dtype=None) -> nn.Module:
    """The run's model with the weights of checkpoint `folder`, in eval mode, on `device`."""
    from s4v.model.backbone import resolve_dtype
    from s4v.train.checkpoint import CONSOLIDATED

    path = Path(folder) / CONSOLIDATED
    if not path.is_file():
        raise ExportError(f"{folder} has no {CONSOLIDATED} (a checkpoint of an older s4v): convert it with "
                          f"DeepSpeed's {Path(folder).parent}/zero_to_fp32.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - a damaged file, whatever torch raises
        raise ExportError(f"{path} cannot be read: {type(err).__name__}: {err}") from None
    weights = {**state.get("buffers", {}), **state["params"]}
    num_classes = weights["head.fc.weight"].shape[0] if "head.fc.weight" in weights else None
    model = _build(cfg, num_classes, pretrained, "cpu")
    # the checkpoint holds every buffer; non-persistent ones (the text tower's causal mask) are rebuilt
    non_persistent = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    weights = {k: v for k, v in weights.items() if k not in non_persistent}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    untrained = ("backbone.", "text.") if cfg.task == "retrieval" else ("backbone.",)
    missing = [k for k in missing if not k.startswith(untrained)]
    if missing or unexpected:
        raise ExportError(f"{path} does not fit the run's model ({cfg.model.name}): missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    if backbone_dtype is not None:
        model.backbone.to(resolve_dtype(backbone_dtype))
    model.checkpoint_step = (state.get("counters") or {}).get("global_steps")
    return model.eval()


def save_export(model: nn.Module, out: Path, include_backbone: bool, protocol: dict) -> None:
    """Write `model` as a native model file with its class names and test protocol (atomically)."""
    from s4v.model.checkpoint_io import save_model

    save_model(model, out, include_backbone=include_backbone, classes=getattr(model, "class_names", None),
               preprocess=protocol)  # a retrieval model: its own format, with the protocol too


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="s4v export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory (or one of its checkpoint folders)")
    p.add_argument("--tag", default=None, help="checkpoint: step_N (or N); default: the newest intact one")
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/model_side_head_<tag>.pt")
    p.add_argument("--pretrained", default=None, help="the tower's weights file (default: the run's model.pretrained)")
    args = p.parse_args(argv)
    from s4v.config import ConfigError
    from s4v.model.weights_file import WeightsFileError

    from .source import ModelSourceError, load_source, resolve

    try:
        src = resolve(args.run_dir, args.tag, prefer_checkpoint=True)
        if src.checkpoint is None:
            raise ExportError(f"{args.run_dir} names a model file, not a run directory")
        model, pre = load_source(src, args.pretrained)
        out = args.out or src.run_dir / f"model_side_head_{src.checkpoint.name}.pt"
        save_export(model, out, include_backbone=src.cfg.model.pretrained is None and args.pretrained is None,
                    protocol=pre.to_dict())
    except (ExportError, ModelSourceError, ConfigError, WeightsFileError, FileNotFoundError) as err:
        print(f"s4v export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (checkpoint {src.checkpoint.name}, step {model.checkpoint_step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
