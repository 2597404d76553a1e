"""The public entry points for using a model: `load`, `create_model` (optionally with its preprocess) and
`read_video`, in the manner of open_clip's `create_model_and_transforms`.

    model, preprocess = s4v.load("runs/ssv2_b16-job1234")          # run dir, export or checkpoint
    video = preprocess("my_clip.mp4")                               # [V, T, 3, S, S]
    probs = model(video).softmax(-1).mean(0)                        # views averaged
    print(model.class_names[int(probs.argmax())])
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from s4v.infer.preprocess import Preprocess


def load(path: str | os.PathLike, pretrained: Optional[str | os.PathLike] = None, device=None,
         backbone_dtype: Optional[str | torch.dtype] = None, tag: Optional[str] = None
         ) -> tuple[nn.Module, "Preprocess"]:
    """Load a trained model and the preprocess of its test protocol.

    Args:
        path: a run directory (its export `model_side_head.pt`, else its newest intact checkpoint), a
            checkpoint folder `RUN/checkpoints/step_N`, or a native s4v model file (recognition or retrieval).
        pretrained: the frozen tower's weights file, for exports without the tower (default: the run's
            `model.pretrained`, when `path` is or sits in a run directory).
        device: where to put the model (default CPU).
        backbone_dtype: "fp32" / "bf16" / "fp16" for the frozen tower (default as saved).
        tag: a run directory's checkpoint to load instead of its export ("step_N" or N).

    Returns:
        (model in eval mode, preprocess). Recognition models carry `class_names` (label order; None if
        neither the file nor the run's data say them).
    """
    from s4v.infer.source import load as load_any

    return load_any(path, pretrained, device, backbone_dtype, tag)


def create_model(name: str, num_classes: Optional[int] = None, num_frames: Optional[int] = None,
                 pretrained: Optional[str | os.PathLike] = None, device=None,
                 backbone_dtype: Optional[str | torch.dtype] = None, return_preprocess: bool = False, **overrides):
    """`s4v.model.factory.create_model` (see there for the arguments); with `return_preprocess=True`
    returns `(model, preprocess)`, the preprocess being the default test protocol for the model's frame
    count and input size (short side image_size * 256/224, centre crop, one clip; retrieval: frames
    evenly over the video)."""
    from s4v.model.factory import create_model as build

    if not return_preprocess:
        return build(name, num_classes, num_frames, pretrained, device, backbone_dtype, **overrides)
    from s4v.infer.preprocess import preprocess_for

    model = build(name, num_classes, num_frames, pretrained, device, backbone_dtype, **overrides)
    return model, preprocess_for(model)
