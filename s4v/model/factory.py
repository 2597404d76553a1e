"""`list_models()` / `create_model()`: the open_clip/timm-style entry points."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .backbone import resolve_dtype
from .classifier import Side4VideoClassifier
from .specs import MODELS, ModelSpec, apply_overrides, closest, get_spec


def list_models() -> list[str]:
    from .retrieval_specs import RETRIEVAL_MODELS

    return sorted([*MODELS, *RETRIEVAL_MODELS])


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give a meta-device module real storage on `device` and run every module's own init,
    children before parents (so SideNetwork's init wins over the Linear defaults)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for sub in reversed(list(module.modules())):
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            elif hasattr(sub, "reset_running_stats"):
                sub.reset_running_stats()


def build_model(spec: ModelSpec, num_classes: int, num_frames: int, name: str = "custom",
                pretrained: Optional[str | os.PathLike] = None, device=None,
                backbone_dtype=None) -> Side4VideoClassifier:
    device = torch.device(device if device is not None else "cpu")
    dtype = resolve_dtype(backbone_dtype)
    # With a weights file, or for inspection, build on `meta` (no memory) and fill in afterwards.
    build_on = torch.device("meta") if (pretrained is not None or device.type == "meta") else device
    with build_on:
        model = Side4VideoClassifier(spec, num_classes, num_frames, name=name)
    if pretrained is not None:
        model.backbone.load(pretrained)
    if build_on.type == "meta" and device.type != "meta":
        materialize(model.side, device)
        materialize(model.head, device)
        model.backbone.to(device)
    if dtype is not None:
        model.backbone.to(dtype)
    return model


def create_model(name: str, num_classes: Optional[int] = None, num_frames: Optional[int] = None,
                 pretrained: Optional[str | os.PathLike] = None, device=None,
                 backbone_dtype: Optional[str | torch.dtype] = None, **overrides) -> nn.Module:
    """Build a Side4Video recognition model, or a retrieval model for the `s4v_retrieval_*` names.

    Args:
        name: one of `list_models()`.
        num_classes: classifier outputs (recognition; ignored by retrieval models).
        num_frames: frames per clip T (default 8 for recognition, 12 for retrieval).
        pretrained: local weights file of the image tower (open_clip, OpenAI or EVA-CLIP format);
            None leaves the tower randomly initialised. Retrieval models load both the image and the
            text tower from it (a full CLIP checkpoint).
        device: where to build it; "meta" builds without memory (shapes and counts only).
        backbone_dtype: "fp32" / "fp16" / "bf16" (or a torch dtype) for the frozen tower.
        **overrides: spec fields, e.g. `side_width=128`, `side.heads=2`, `backbone.image_size=256`;
            retrieval models also take `text.<field>` and the keywords `interaction` ("wti" | "mean"),
            `freeze_text` and `max_temperature` (see `s4v.model.retrieval.create_retrieval_model`).
    """
    from .retrieval_specs import RETRIEVAL_MODELS

    if name in RETRIEVAL_MODELS:
        from .retrieval import create_retrieval_model

        return create_retrieval_model(name, num_frames or 12, pretrained, device, backbone_dtype, **overrides)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}" + closest(name, [*MODELS, *RETRIEVAL_MODELS]))
    if num_classes is None:
        raise ValueError(f"create_model({name!r}): num_classes is required for recognition models")
    spec = apply_overrides(get_spec(name), overrides) if overrides else get_spec(name)
    return build_model(spec, num_classes, num_frames or 8, name, pretrained, device, backbone_dtype)
