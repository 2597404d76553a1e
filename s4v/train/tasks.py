"""What differs between the training tasks, behind one small interface used by `loop.Trainer`.

A task builds the model, says which modules DeepSpeed owns and with which parameter groups, computes
the loss of a batch, evaluates, and exports. `recognition` is the classifier of docs/method.md 2 (its code moved
here unchanged); `retrieval` is the text-video model of docs/method.md 5:

- DeepSpeed owns the side network, the video head (post BN3d + zero-init `side_proj`), the tower's
  final norm/projection, the WTI heads, the temperature and, unless `retrieval.freeze_text`, the text
  tower. The frozen image tower (and a frozen text tower) run outside it under no_grad.
- Loss: symmetric InfoNCE over the *global* batch. Every rank gathers all ranks' prepared features
  with `gather_with_grad` (backward: the gradient summed over ranks, this rank's slice), so that
  with DeepSpeed's gradient averaging the update is exactly the gradient of the global loss.
  Samples that failed to decode (`valid` False: copies of other samples) and videos without captions
  are left out of the loss, as queries and as negatives.
- Parameter groups: `optim.lr` for side/video head/WTI heads, `retrieval.clip_lr` for the CLIP parts;
  weight decay `optim.weight_decay` except on `*bias` (`retrieval.no_decay_bias`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

import s4v
from s4v.experiment import ExperimentConfig
from s4v.train.compile import compile_model
from s4v.train.dist import DistInfo, barrier

log = logging.getLogger("s4v.train")


def single_view(data_cfg):
    """The data config of the quick during-training evaluation: one centre crop, one clip."""
    import dataclasses

    return dataclasses.replace(data_cfg, test_crops=1, test_clips=1)


def validation_loader(data_cfg, info: DistInfo, full_views: bool):
    """(data config, loader) of an evaluation during training: every test view, or one (`single_view`)."""
    from s4v.data.loader import build_loader

    d = data_cfg if full_views else single_view(data_cfg)
    return d, build_loader(d, d.val_split, train=False, rank=info.rank, world_size=info.world_size, epoch=0,
                           device=info.device.type)


@contextlib.contextmanager
def evaluating(engine):
    """The engine in eval mode for the block, back in train mode afterwards (whatever happens)."""
    engine.eval()
    try:
        yield
    finally:
        engine.train()


# =========================================================================================== recognition
class RecognitionTask:
    metric = "top1"  # what `best_top1` tracks

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def build_model(self, info: DistInfo):
        from s4v.train.sync_bn import convert_sync_token_bn

        m = self.cfg.model
        model = s4v.create_model(m.name, m.num_classes, m.num_frames, pretrained=m.pretrained,
                                 device=info.device, backbone_dtype=m.backbone_dtype, **m.overrides)
        model.set_grad_checkpointing(m.grad_checkpointing)
        if self.cfg.train.sync_bn and info.world_size > 1:
            convert_sync_token_bn(model.side)
            convert_sync_token_bn(model.head)
        return compile_model(model, self.cfg.train.compile)

    def initialize(self, trainer, ds_config: dict, lr_lambda):
        from s4v.train.engine import TrainableSide, deepspeed_initialize, param_groups

        o = self.cfg.optim
        groups = param_groups(trainer.model.trainable_modules(), o.weight_decay, o.no_decay_norm_bias)
        return deepspeed_initialize(TrainableSide(trainer.model), ds_config, groups, lr_lambda, o)

    def forward(self, trainer, video: torch.Tensor) -> torch.Tensor:
        taps = trainer.model.backbone(video.flatten(0, 1))  # no_grad, frozen tower dtype
        return trainer.engine(video, taps)

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        device = trainer.info.device
        video = batch["video"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        valid = batch["valid"].to(device) if "valid" in batch else torch.ones_like(labels, dtype=torch.bool)
        logits = self.forward(trainer, video)
        # Slots of samples that failed to decode hold copies of good ones; they do not count.
        losses = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing,
                                 reduction="none")
        return (losses * valid).sum() / valid.sum().clamp_min(1)

    def evaluate(self, trainer, full_views: bool) -> dict:
        from s4v.eval.evaluate import evaluate
        from s4v.train.metrics import confusion_image

        cfg, info = self.cfg, trainer.info
        _, loader = validation_loader(cfg.data, info, full_views)
        with evaluating(trainer.engine):
            report = evaluate(lambda v: self.forward(trainer, v), loader, cfg.model.num_classes, info.device,
                              progress=info.is_main)
        prefix = "val" if full_views else "val_single"
        trainer.logger.log(trainer.step, {f"{prefix}/top1": report["top1"], f"{prefix}/top5": report["top5"],
                                          f"{prefix}/mean_class_acc": report["mean_class_acc"]})
        trainer.logger.image(f"{prefix}/confusion", confusion_image(report["confusion"]), trainer.step)
        log.info("%s at step %d: top1 %.4f top5 %.4f mean-class %.4f (%d clips)", prefix, trainer.step,
                 report["top1"], report["top5"], report["mean_class_acc"], report["num_evaluated"])
        check_unreadable(trainer, prefix, report)
        return report

    def result_fields(self, report: dict) -> dict:
        return {"val_top1": report["top1"], "val_top5": report["top5"],
                "val_mean_class_acc": report["mean_class_acc"]}

    def export(self, trainer) -> Optional[Path]:
        from s4v.data.format import SplitIndex
        from s4v.model.checkpoint_io import save_model

        from s4v.infer.preprocess import protocol_dict

        classes = SplitIndex.load(self.cfg.data.root, self.cfg.data.train_split).classes  # kept for `s4v eval`
        protocol = protocol_dict(self.cfg.data)  # the test protocol `s4v.load` / `s4v predict` follow
        return _export(trainer, lambda path: save_model(trainer.model, path, classes=classes, preprocess=protocol,
                                                        include_backbone=self.cfg.model.pretrained is None))


def _export(trainer, save: Callable[[Path], None]) -> Path:
    """Save the model (rank 0) with the engine's fp32 master weights: DeepSpeed's bf16/fp16 engines cast
    the module in place, so `model.state_dict()` alone would hold low-precision copies. Engine-owned
    floating buffers (BN statistics) are saved as float32. Loading it needs the tower's weights file
    too unless the tower was random."""
    from s4v.train.checkpoint import fp32_state

    engine = trainer.engine
    masters = fp32_state(engine, rank0_only=True)  # a collective: ZeRO gathers the partitions
    path = trainer.run_dir / "model_side_head.pt"
    if trainer.info.is_main:
        by_id = {id(p): masters[name] for name, p in engine.module.named_parameters()}
        owned_buffers = {id(b) for b in engine.module.buffers()}
        model = trainer.model
        fp32 = {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}
        fp32.update({name: b.detach().float().cpu() for name, b in model.named_buffers()
                     if id(b) in owned_buffers and b.is_floating_point()})

        def use_fp32(module, state_dict, prefix, local_metadata) -> None:
            for name, value in fp32.items():
                if prefix + name in state_dict:
                    state_dict[prefix + name] = value

        handle = model.register_state_dict_post_hook(use_fp32)
        try:
            save(path)
        finally:
            handle.remove()
        log.info("exported the trained model to %s", path)
    barrier()
    return path


def check_unreadable(trainer, prefix: str, report: dict) -> None:
    """Log an evaluation's video counts (and the unreadable keys); beyond `eval.max_skip_fraction`
    unreadable videos, save this point's checkpoint (no training is lost) and stop (EvalSkipError)."""
    from s4v.eval.skips import EvalSkipError, check_skip_fraction, describe_unreadable

    trainer.logger.log(trainer.step, {f"{prefix}/num_samples": report["num_samples"],
                                      f"{prefix}/num_unreadable": report["num_unreadable"]})
    if report["num_unreadable"]:
        log.warning("%s: %d of %d videos could not be read and are not in the metrics: %s", prefix,
                    report["num_unreadable"], report["num_samples"], describe_unreadable(report))
        writer = getattr(trainer.logger, "writer", None)
        if writer is not None:
            writer.add_text(f"{prefix}/unreadable", describe_unreadable(report), trainer.step)
    try:
        check_skip_fraction(report, trainer.cfg.eval.max_skip_fraction)
    except EvalSkipError:
        trainer.save()
        raise


# ============================================================================================ retrieval
def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 (equal sizes on every rank); backward sums the gradient over ranks (each
    rank computed the same global loss) and returns this rank's slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    send = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
    parts = [torch.empty_like(send) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, send)
    out = torch.cat(parts, dim=0)
    return out.bool() if x.dtype == torch.bool else out


def contrastive_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP4Clip `CrossEn` on logits and logits.T) over the valid pairs; text i
    matches video i. Invalid rows and columns take no part."""
    idx = valid.nonzero().view(-1)
    if idx.numel() == 0:
        return logits.sum() * 0.0
    sub = logits.float()[idx][:, idx]
    target = torch.arange(idx.numel(), device=sub.device)
    return (F.cross_entropy(sub, target) + F.cross_entropy(sub.t(), target)) / 2


class RetrievalEngineModule(nn.Module):
    """What DeepSpeed owns for retrieval (see the module doc). `forward(op, ...)`:

    - `"loss", video, taps, ids, valid` -> global symmetric InfoNCE (scalar);
    - `"video", video, taps` -> prepared `VideoEmbedding`;
    - `"text", ids` -> prepared `TextEmbedding`.
    """

    def __init__(self, model):
        super().__init__()
        self.side, self.video_head, self.visual_proj = model.side, model.video_head, model.visual_proj
        self.interaction, self.temperature = model.interaction, model.temperature
        if model.freeze_text:
            self.text = None
            self._frozen_text = [model.text]  # a list: not a submodule, so not DeepSpeed's
        else:
            self.text = model.text
            self._frozen_text = []

    def _text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        from s4v.model.retrieval import text_token_features

        if self.text is not None:
            return text_token_features(self.text, ids)[0]
        with torch.no_grad():
            return text_token_features(self._frozen_text[0], ids)[0]

    def video(self, video: torch.Tensor, taps):
        from s4v.model.retrieval import video_embeddings

        frames = video_embeddings(self.side, self.video_head, self.visual_proj, video, taps)
        return self.interaction.prepare_video(frames)

    def text_embedding(self, ids: torch.Tensor):
        return self.interaction.prepare_ids(self._text_tokens(ids), ids)

    def loss(self, video: torch.Tensor, taps, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        from s4v.model.wti import TextEmbedding, VideoEmbedding, token_wise_score

        v = self.video(video, taps)
        t = self.text_embedding(ids)
        v_all = VideoEmbedding(gather_with_grad(v.feats), gather_with_grad(v.weights))
        t_all = TextEmbedding(gather_with_grad(t.feats), gather_no_grad(t.mask), gather_with_grad(t.weights))
        logits = self.temperature() * token_wise_score(t_all, v_all)
        return contrastive_loss(logits, gather_no_grad(valid))

    def forward(self, op: str, *args):
        if op == "loss":
            return self.loss(*args)
        if op == "video":
            return self.video(*args)
        if op == "text":
            return self.text_embedding(*args)
        raise ValueError(f"unknown op {op!r}")


def retrieval_param_groups(model, lr: float, clip_lr: float, weight_decay: float, no_decay_bias: bool) -> list[dict]:
    """Side-rate (`lr`): side network, video head, WTI heads. CLIP-rate (`clip_lr`): the tower's final
    norm/projection, the temperature and the text tower (if trained). Biases without decay (optional)."""
    parts = model.trainable_modules()
    side_parts, clip_parts = ("side", "video_head", "interaction"), ("visual_proj", "temperature", "text")
    groups = []
    for names, group_lr in ((side_parts, lr), (clip_parts, clip_lr)):
        decay, no_decay = [], []
        for part in names:
            if part not in parts:
                continue
            for pname, p in parts[part].named_parameters():
                if p.requires_grad:
                    (no_decay if no_decay_bias and pname.endswith("bias") else decay).append(p)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr": group_lr})
    return groups


class RetrievalTask:
    metric = "t2v_r1"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self._captions: dict[str, Any] = {}

    def captions(self, split: str):
        from s4v.data.captions import CaptionBank

        if split not in self._captions:
            self._captions[split] = CaptionBank.load(self.cfg.data.root, split)
            bank = self._captions[split]
            log.info("captions of %s: %d videos, %d captions", split, len(bank), bank.num_captions)
        return self._captions[split]

    def build_model(self, info: DistInfo):
        from s4v.train.sync_bn import convert_sync_token_bn

        m, r = self.cfg.model, self.cfg.retrieval
        model = s4v.create_model(m.name, num_frames=m.num_frames, pretrained=m.pretrained, device=info.device,
                                 backbone_dtype=m.backbone_dtype, interaction=r.interaction,
                                 freeze_text=r.freeze_text, max_temperature=r.max_temperature, **m.overrides)
        model.set_grad_checkpointing(m.grad_checkpointing)
        if self.cfg.train.sync_bn and info.world_size > 1:
            convert_sync_token_bn(model.side)
            convert_sync_token_bn(model.video_head)
        self.captions(self.cfg.data.train_split)
        return compile_model(model, self.cfg.train.compile)

    def initialize(self, trainer, ds_config: dict, lr_lambda):
        from s4v.train.engine import deepspeed_initialize

        o, r = self.cfg.optim, self.cfg.retrieval
        groups = retrieval_param_groups(trainer.model, o.lr, r.clip_lr, o.weight_decay, r.no_decay_bias)
        return deepspeed_initialize(RetrievalEngineModule(trainer.model), ds_config, groups, lr_lambda, o)

    def tokenize(self, texts, device) -> torch.Tensor:
        from s4v.model.retrieval import tokenize_for
        from s4v.model.specs import get_spec

        return tokenize_for(get_spec(self.cfg.model.name), texts, self.cfg.retrieval.max_words).to(device)

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        device = trainer.info.device
        video = batch["video"].to(device, non_blocking=True)
        keys = list(batch["key"])
        texts = self.captions(self.cfg.data.train_split).pick(keys, trainer.epoch, self.cfg.data.seed,
                                                              self.cfg.retrieval.caption_sampling)
        valid = batch["valid"].clone() if "valid" in batch else torch.ones(len(keys), dtype=torch.bool)
        valid &= torch.tensor([bool(t) for t in texts])
        ids = self.tokenize(texts, device)
        taps = trainer.model.backbone(video.flatten(0, 1))  # no_grad, frozen tower dtype
        return trainer.engine("loss", video, taps, ids, valid.to(device))

    def evaluate(self, trainer, full_views: bool) -> dict:
        from s4v.eval.retrieval import evaluate_retrieval

        cfg, info = self.cfg, trainer.info
        d, loader = validation_loader(cfg.data, info, full_views)
        engine, model = trainer.engine, trainer.model
        with evaluating(engine):
            report = evaluate_retrieval(
                lambda v: engine("video", v, model.backbone(v.flatten(0, 1))),
                lambda texts: engine("text", self.tokenize(texts, info.device)),
                loader, self.captions(d.val_split), info.device, progress=info.is_main,
                ties=cfg.retrieval.eval_ties, block=cfg.retrieval.eval_block)
        prefix = "val" if full_views else "val_single"
        log_retrieval(trainer.logger, trainer.step, prefix, report)
        check_unreadable(trainer, prefix, report)
        return report

    def result_fields(self, report: dict) -> dict:
        return {f"val_{k}": v for k, v in report.items() if k.startswith(("t2v_", "v2t_"))}

    def export(self, trainer) -> Optional[Path]:
        from s4v.infer.preprocess import protocol_dict
        from s4v.model.retrieval import save_retrieval_model

        protocol = protocol_dict(self.cfg.data)  # the test protocol `s4v.load` / `s4v extract` follow
        return _export(trainer, lambda path: save_retrieval_model(
            trainer.model, path, include_backbone=self.cfg.model.pretrained is None, preprocess=protocol))


def log_retrieval(logger, step: int, prefix: str, report: dict) -> None:
    logger.log(step, {f"{prefix}/{k}": v for k, v in report.items() if k.startswith(("t2v_", "v2t_"))})
    log.info("%s at step %d: T2V R@1 %.1f R@5 %.1f R@10 %.1f MdR %.1f MnR %.1f | V2T R@1 %.1f R@5 %.1f R@10 %.1f "
             "MdR %.1f MnR %.1f (%d texts, %d videos)", prefix, step,
             *(report[f"{d}_{m}"] for d in ("t2v", "v2t") for m in ("r1", "r5", "r10", "medr", "meanr")),
             report["num_texts"], report["num_videos"])


def make_task(cfg: ExperimentConfig):
    return RetrievalTask(cfg) if cfg.task == "retrieval" else RecognitionTask(cfg)
