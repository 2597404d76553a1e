"""`DataConfig`: every knob of the video input pipeline (both loaders read the same fields).

Defaults follow the Kinetics-400 recipe (docs/method.md 6.1); the Something-Something recipe
sets `sampling: segment`, `resize_mode: fixed`, `flip_label_swap`, `grayscale_prob: 0`,
`rand_augment` and `repeated_aug: 2` in its experiment YAML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from s4v.config import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DataConfig:
    # --- where the data is
    root: str = ""  # folder holding `{split}-NNNNNN.tar` shards and `{split}-index.json`
    train_split: str = "train"  # split name of the training shards
    val_split: str = "val"  # split name of the evaluation shards
    loader: Literal["dali", "pyav"] = "dali"  # decode engine; "pyav" is the no-DALI fallback
    device: Literal["gpu", "cpu"] = "gpu"  # DALI decode device: "gpu" = mixed (NVDEC), "cpu" = VP8/VP9/MJPEG only (s4v/data/codecs.py)

    # --- temporal sampling
    num_frames: int = 8  # T, frames per clip
    sampling: Literal["segment", "uniform"] = "uniform"  # "segment": TSN (SSv2); "uniform": K400 rule (seg=(n-1)/T)
    test_sampling: Optional[Literal["segment", "uniform", "linspace"]] = None  # evaluation rule (None: `sampling`); "linspace": T frames evenly over the video, ends included (CLIP4Clip, MSR-VTT/MSVD test)

    # --- spatial pipeline
    image_size: int = 224  # output H = W in pixels
    resize_mode: Literal["short_side", "fixed"] = "short_side"  # K400: short side; SS: fixed HxW
    resize_short: int = 256  # short side in pixels when resize_mode == "short_side"
    resize_fixed: tuple[int, int] = (256, 320)  # (H, W) in pixels when resize_mode == "fixed"
    crop_area: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)  # random resized crop: aspect (w/h) range
    flip: bool = True  # random horizontal flip (train)
    flip_prob: float = 0.5  # probability of the horizontal flip
    flip_label_swap: list[list[int]] = field(default_factory=list)  # [a, b] class pairs swapped when flipped (SSv2: [[86,87],[93,94],[166,167]])
    grayscale_prob: float = 0.2  # random grayscale probability (train; SS recipe: 0)
    rand_augment: Optional[str] = None  # timm-style spec, e.g. "rand-m7-n4-mstd0.5-inc1"; same ops for every frame; each drawn op applied with p 0.5 ("-pX" changes it)
    rand_augment_translate: int = 115  # RandAugment max translation in pixels (0.45 * 256)
    repeated_aug: int = 1  # augmented copies of each training video per batch (SS recipe: 2)
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean (0..1 scale)
    std: tuple[float, float, float] = CLIP_STD  # per-channel std (0..1 scale)

    # --- evaluation views
    test_crops: int = 1  # spatial crops per clip at test time: 1 (centre) or 3 (left/centre/right)
    test_clips: int = 1  # temporal clips per video at test time

    # --- batching and reading
    batch_size: int = 8  # videos per rank per step (a train batch holds batch_size * repeated_aug clips)
    num_workers: int = 4  # pyav: DataLoader worker processes; dali: CPU threads of the pipeline
    shuffle_buffer: int = 512  # train: samples per shuffle window (samples are permuted inside a window)
    min_shards_per_reader: int = 1  # raise unless shards >= this * world_size * max(1, num_workers); 0 disables
    prefetch: int = 2  # batches prepared ahead of the training loop
    dali_pipelines: int = 1  # dali: pipelines per rank, batches dealt round-robin (GPU: each keeps ~one NVDEC engine busy)
    dali_prefetch: int = 2  # dali: batches each pipeline runs ahead, pipelined and async (1: synchronous, the old engine)
    dali_read_threads: int = 2  # dali: threads reading tar members and planning samples ahead (0: in the driving thread)
    output_dtype: Literal["auto", "float32", "float16"] = "auto"  # dali: video dtype; auto: float16 under a half-precision tower (experiments), else float32
    seed: int = 0  # base seed of shard order, frame sampling and augmentation
    num_classes: Optional[int] = None  # labels outside [0, num_classes) are skipped and counted (None: no check); the trainer sets model.num_classes

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"data: {msg}")

        if self.num_frames < 1:
            bad(f"num_frames must be >= 1, got {self.num_frames}")
        if self.test_crops not in (1, 3):
            bad(f"test_crops must be 1 or 3, got {self.test_crops}")
        for name in ("test_clips", "repeated_aug", "batch_size", "image_size", "resize_short"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.resize_fixed) != 2 or min(self.resize_fixed) < 1:
            raise ConfigError(f"data.resize_fixed must be [H, W] with H, W >= 1, got {list(self.resize_fixed)}")
        if self.test_sampling == "linspace" and self.test_clips != 1:
            bad(f"test_sampling: linspace takes one test clip, got test_clips={self.test_clips}")
        if not 0 < self.crop_area[0] <= self.crop_area[1] <= 1:
            bad(f"crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            bad(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for pair in self.flip_label_swap:
            if len(pair) != 2:
                bad(f"flip_label_swap entries are [a, b] pairs, got {pair}")
        if self.rand_augment:
            from s4v.data.augment import parse_rand_augment

            try:
                parse_rand_augment(self.rand_augment)
            except ValueError as e:
                bad(str(e))
        for name in ("dali_pipelines", "dali_prefetch"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dali_read_threads < 0:
            bad(f"dali_read_threads must be >= 0, got {self.dali_read_threads}")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            bad("num_workers must be >= 0 and shuffle_buffer >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            bad(f"num_classes must be >= 1 (or null), got {self.num_classes}")
