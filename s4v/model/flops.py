"""Parameter and FLOP counts of a model, computed on the meta device (no memory, no weights)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode



@dataclass
class ModelStats:
    total_params: int
    frozen_params: int
    trainable_params: int
    backbone_gflops: float  # per view, multiply-accumulates x 1e-9 (the convention of the paper's tables)
    side_gflops: float  # side network + head (retrieval: + video projection; the text tower is not counted)

    @property
    def gflops(self) -> float:
        return self.backbone_gflops + self.side_gflops


def param_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, total - trainable, trainable


def count_flops(model: torch.nn.Module, num_frames: int | None = None) -> tuple[float, float]:
    """GFLOPs of one view (one clip of `num_frames` frames), backbone and side separately.

    Counted as multiply-accumulates like fvcore, which the Side4Video paper's GFLOPs use (B/16, 8
    frames: about 176 per view). Runs on the meta device, so it is cheap even for ViT-E/14.
    """
    t = num_frames or model.num_frames
    size = model.spec.backbone.image_size
    meta = next(model.parameters()).is_meta
    device = "meta" if meta else next(model.parameters()).device
    video = torch.zeros(1, t, 3, size, size, device=device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            taps = model.backbone(video.flatten(0, 1))
        backbone = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            if hasattr(model, "encode_video"):  # retrieval: side network + projection onto frozen CLS
                model.encode_video(video, taps)
            else:
                model.head(model.side(video, taps), 1)
        side = counter.get_total_flops()
    return backbone / 2e9, side / 2e9


def model_stats(model: torch.nn.Module, num_frames: int | None = None) -> ModelStats:
    total, frozen, trainable = param_counts(model)
    backbone, side = count_flops(model, num_frames)
    return ModelStats(total, frozen, trainable, backbone, side)
