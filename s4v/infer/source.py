"""What a MODEL argument names, and loading it: a run directory, a checkpoint folder, or a model file.

- a run directory (`config.yaml` inside): its export `model_side_head.pt`, or without one its newest
  intact checkpoint (s4v.infer.export);
- a checkpoint folder `RUN/checkpoints/step_N` (or its `fp32_state.pt`): that checkpoint;
- a native s4v model file (recognition or retrieval): as it is; the protocol it stores, else that of
  the run directory it sits in, else the defaults (s4v.infer.preprocess).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .preprocess import Preprocess, preprocess_for, protocol_dict

log = logging.getLogger(__name__)
EXPORT_NAME = "model_side_head.pt"


class ModelSourceError(ValueError):
    """A MODEL argument that names nothing loadable (the message says what was expected)."""


@dataclass
class ModelSource:
    run_dir: Optional[Path]  # the run directory, when there is one
    model_file: Optional[Path]  # a native model file, or None to load `checkpoint`
    checkpoint: Optional[Path]  # a checkpoint folder (step_N), when there is no model file
    cfg: Any = None  # the run's ExperimentConfig (absolute paths), when there is a run directory


def run_config(run_dir: Path):
    """The run's experiment config, relative data/weights paths made absolute against its launch folder."""
    from s4v.experiment import load_experiment
    from s4v.train.run_dir import latest_config, launch_dir, with_absolute_paths

    cfg = load_experiment(str(latest_config(run_dir)))
    base = launch_dir(run_dir)
    return with_absolute_paths(cfg, base) if base is not None else cfg


def _is_checkpoint(folder: Path) -> bool:
    from s4v.train.checkpoint import COMPLETE, CONSOLIDATED

    return folder.is_dir() and ((folder / COMPLETE).is_file() or (folder / CONSOLIDATED).is_file())


def resolve(path: str | Path, tag: Optional[str] = None, prefer_checkpoint: bool = False) -> ModelSource:
    """Say what `path` is (module doc). For a run directory, `tag` (or `prefer_checkpoint`: the newest
    intact one) picks a checkpoint instead of its export."""
    from s4v.train.checkpoint import CONSOLIDATED

    path = Path(path)
    if not path.exists():
        raise ModelSourceError(f"no model {path}: expected a run directory, a checkpoint folder or a model file")
    if path.is_file() and path.name == CONSOLIDATED:
        path = path.parent
    if path.is_dir() and _is_checkpoint(path):
        run_dir = path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise ModelSourceError(f"checkpoint {path} is not inside a run directory (no {run_dir}/config.yaml): "
                                   "its model cannot be rebuilt")
        return ModelSource(run_dir, None, path, run_config(run_dir))
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ModelSourceError(f"{path} is a folder but not a run directory (no config.yaml) nor a checkpoint")
        cfg = run_config(path)
        if tag is None and not prefer_checkpoint and (path / EXPORT_NAME).is_file():
            return ModelSource(path, path / EXPORT_NAME, None, cfg)
        from .export import choose_checkpoint

        return ModelSource(path, None, choose_checkpoint(path, tag), cfg)
    run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
    return ModelSource(run_dir, path, None, run_config(run_dir) if run_dir else None)


def read_header(path: Path) -> dict[str, Any]:
    """A model file's dict without its tensors' data (memory-mapped); {} for anything else."""
    from s4v.model.weights_file import WeightsFileError, load_torch_file

    try:
        ckpt = load_torch_file(path, mmap=True)
    except WeightsFileError:
        return {}
    return {k: v for k, v in ckpt.items() if k != "state_dict"} if isinstance(ckpt, dict) else {}


def train_classes(cfg) -> Optional[list[str]]:
    """The class names of the run's training split index, if it can still be read."""
    from s4v.data.format import SplitIndex

    try:
        return SplitIndex.load(cfg.data.root, cfg.data.train_split).classes or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_source(src: ModelSource, pretrained=None, device=None, backbone_dtype=None) -> tuple[nn.Module, Preprocess]:
    """The model (eval mode, `class_names` set for recognition) and its preprocess."""
    if pretrained is None and src.cfg is not None:
        pretrained = src.cfg.model.pretrained
    header: dict[str, Any] = {}
    if src.model_file is not None:
        from s4v.model.checkpoint_io import FORMAT, load_model
        from s4v.model.retrieval import FORMAT as RETRIEVAL_FORMAT, load_retrieval_model

        header = read_header(src.model_file)
        if header.get("format") == RETRIEVAL_FORMAT:
            model = load_retrieval_model(src.model_file, pretrained, device, backbone_dtype)
        elif header.get("format") == FORMAT or not header:
            model = load_model(src.model_file, pretrained, device, backbone_dtype)  # says what a bad file is
        else:
            raise ModelSourceError(f"{src.model_file} is not an s4v model file (format {header.get('format')!r}); "
                                   "official Side4Video checkpoints: `s4v convert-official` first")
    else:
        from .export import model_from_checkpoint

        model = model_from_checkpoint(src.run_dir, src.checkpoint, src.cfg, pretrained, device, backbone_dtype)
    if hasattr(model, "num_classes") and not getattr(model, "class_names", None) and src.cfg is not None:
        names = train_classes(src.cfg)
        model.class_names = names if names and len(names) == model.num_classes else None
    protocol = header.get("preprocess") or (protocol_dict(src.cfg.data) if src.cfg is not None else None)
    return model, preprocess_for(model, protocol)


def load(path, pretrained=None, device=None, backbone_dtype=None, tag: Optional[str] = None
         ) -> tuple[nn.Module, Preprocess]:
    return load_source(resolve(path, tag), pretrained, device, backbone_dtype)
