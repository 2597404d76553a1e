"""`list_models()` / `create_model()`: the open_clip/timm-style entry points, for recognition and
retrieval models alike (one table: `s4v.model.registry.MODELS`)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .backbone import materialize, resolve_dtype
from .classifier import Side4VideoClassifier
from .pretrained import resolve_pretrained
from .registry import MODELS
from .retrieval import build_retrieval_model
from .specs import ModelSpec, apply_overrides, closest

__all__ = ["list_models", "create_model", "build_model", "materialize"]


def list_models() -> list[str]:
    return sorted(MODELS)


def build_model(spec: ModelSpec, num_classes: Optional[int] = None, num_frames: Optional[int] = None,
                name: str = "custom", pretrained: Optional[str | os.PathLike] = None, device=None,
                backbone_dtype=None, **retrieval_options) -> nn.Module:
    """Build the model `spec` describes: a retrieval model when it has a text tower (`retrieval_options`:
    `interaction`, `freeze_text`, `max_temperature`), else a classifier of `num_classes` outputs."""
    if pretrained is not None:
        pretrained = resolve_pretrained(spec.backbone, pretrained)
    if spec.text is not None:
        return build_retrieval_model(spec, num_frames or 12, name, pretrained, device, backbone_dtype,
                                     **retrieval_options)
    if retrieval_options:
        raise ValueError(f"{name}: {', '.join(retrieval_options)} only apply to retrieval models")
    if num_classes is None:
        raise ValueError(f"create_model({name!r}): num_classes is required for recognition models")
    device = torch.device(device if device is not None else "cpu")
    dtype = resolve_dtype(backbone_dtype)
    # With a weights file, or for inspection, build on `meta` (no memory) and fill in afterwards.
    build_on = torch.device("meta") if (pretrained is not None or device.type == "meta") else device
    with build_on:
        model = Side4VideoClassifier(spec, num_classes, num_frames or 8, name=name)
    if pretrained is not None:
        model.backbone.load(pretrained)
    if build_on.type == "meta" and device.type != "meta":
        materialize(model.side, device)
        materialize(model.head, device)
        model.backbone.to(device)
    if dtype is not None:
        model.backbone.to(dtype)
    return model


_RETRIEVAL_OPTIONS = ("interaction", "freeze_text", "max_temperature")


def create_model(name: str, num_classes: Optional[int] = None, num_frames: Optional[int] = None,
                 pretrained: Optional[str | os.PathLike] = None, device=None,
                 backbone_dtype: Optional[str | torch.dtype] = None, **overrides) -> nn.Module:
    """Build a Side4Video recognition model, or a retrieval model for the `s4v_retrieval_*` names.

    Args:
        name: one of `list_models()`.
        num_classes: classifier outputs (recognition; ignored by retrieval models).
        num_frames: frames per clip T (default 8 for recognition, 12 for retrieval).
        pretrained: the tower's weights: a local file (open_clip, OpenAI, EVA-CLIP, timm or the
            family's original format), or an open_clip pretrained tag / `hf-hub:ORG/NAME` found in the
            local Hugging Face cache (offline; s4v/model/pretrained.py). None leaves the tower randomly
            initialised. Retrieval models load both the image and the text tower from it.
        device: where to build it; "meta" builds without memory (shapes and counts only).
        backbone_dtype: "fp32" / "fp16" / "bf16" (or a torch dtype) for the frozen tower.
        **overrides: spec fields, e.g. `side_width=128`, `side.heads=2`, `backbone.image_size=256`;
            retrieval models also take `text.<field>` and the keywords `interaction` ("wti" | "mean"),
            `freeze_text` and `max_temperature` (see `s4v.model.retrieval.create_retrieval_model`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}" + closest(name, MODELS))
    spec = MODELS[name]
    options = {k: overrides.pop(k) for k in _RETRIEVAL_OPTIONS if k in overrides and spec.text is not None}
    if overrides:
        spec = apply_overrides(spec, overrides)
    return build_model(spec, num_classes, num_frames, name, pretrained, device, backbone_dtype, **options)
