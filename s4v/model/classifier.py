"""Side4Video recognition model: frozen tower + side network + head. forward(video) -> logits."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .backbone import FrozenBackbone
from .side_net import RecognitionHead, SideNetwork
from .specs import ModelSpec


class Side4VideoClassifier(nn.Module):
    """Input: float video `[B, T, 3, H, W]`, normalised with the backbone's mean/std.
    Output: logits `[B, num_classes]`. Only `side` and `head` hold trainable parameters."""

    def __init__(self, spec: ModelSpec, num_classes: int, num_frames: int, name: str = "custom"):
        super().__init__()
        if num_classes < 1 or num_frames < 1:
            raise ValueError(f"num_classes and num_frames must be >= 1 (got {num_classes}, {num_frames})")
        self.name, self.spec = name, spec
        self.num_classes, self.num_frames = num_classes, num_frames
        bb = spec.backbone
        taps = spec.side.tap_layers(bb.layers)
        self.backbone = FrozenBackbone(bb, taps)
        self.side = SideNetwork(spec.side, bb.width, bb.patch_size, bb.num_patches, len(taps))
        self.head = RecognitionHead(spec.side.width, num_classes, spec.side.post_bn, spec.side.drop_fc)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        self.check_input(video)
        taps = self.backbone(video.flatten(0, 1))
        return self.head(self.side(video, taps), video.shape[0])

    def check_input(self, video: torch.Tensor) -> None:
        size = self.spec.backbone.image_size
        if video.dim() != 5 or video.shape[2] != 3 or tuple(video.shape[-2:]) != (size, size):
            raise ValueError(f"{self.name} expects video [B, T, 3, {size}, {size}], got {tuple(video.shape)}")

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules an optimizer (or DeepSpeed engine) should own: side network and head."""
        return nn.ModuleDict({"side": self.side, "head": self.head})

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.trainable_modules().parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute side blocks in backward instead of keeping their activations (open_clip/timm API)."""
        self.side.grad_checkpointing = enable
