"""Test helper run under torchrun (or alone): the real trainable part of `s4v_tiny` in a DeepSpeed engine
(CPU, gloo) on a fixed global batch of 4 clips split over the ranks.

    python -m tests._elastic_worker --stage 2 --dtype fp32 --out DIR [--load CKPT_DIR] [--save CKPT_DIR]
        [--export]

--load: load the newest checkpoint of CKPT_DIR (any world size) into a fresh engine and write
  DIR/loaded.pt (fp32 master weights, Adam moments and step, lr, DeepSpeed's step count, the number of
  saved rank states); then run one optimizer step on the global batch and write DIR/next.pt.
--save: otherwise train 2 steps, checkpoint as step 2 (writing DIR/saved.pt: the same fields), then one
  more step (DIR/next.pt). --export: afterwards export the model as the trainer does (DIR/model.pt)
  and write the engine's fp32 masters (DIR/masters.pt).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import SimpleNamespace

import torch

GLOBAL_BATCH = 4


def build(stage: int, dtype: str, world: int):
    import s4v
    from s4v.train.engine import (TrainableSide, build_ds_config, deepspeed_initialize, load_ds_json,
                                  param_groups, warmup_cosine)
    from s4v.train.sync_bn import convert_sync_token_bn

    torch.manual_seed(0)
    model = s4v.create_model("s4v_tiny", 6, 4, device="cpu", backbone_dtype="fp32")
    if world > 1:
        convert_sync_token_bn(model.side)
        convert_sync_token_bn(model.head)
    # eps 1e-3, not 1e-8: biases in front of a norm get float-noise gradients (~1e-9) that differ with
    # the ranks' reduction order (as do real gradients, by ~1e-4 relative, through the synced norms),
    # and Adam with a tiny eps turns noise into lr-sized steps; with 1e-3 such differences stay below
    # 1e-6 while real gradients (1e-5..1e-3) still move the weights by up to ~lr/10.
    optim = SimpleNamespace(optimizer="adamw", lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.05)
    base = load_ds_json(f"ds_configs/zero{stage}_{dtype}.json")
    ds = build_ds_config(base, micro_batch=GLOBAL_BATCH // world, grad_accum=1, world_size=world, grad_clip=1.0,
                         lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                         device_type="cpu")
    groups = param_groups(model.trainable_modules(), optim.weight_decay, True)
    engine, _, _ = deepspeed_initialize(TrainableSide(model), ds, groups, warmup_cosine(10, 2), optim)
    return model, engine


def step(model, engine, rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(123)
    video = torch.randn(GLOBAL_BATCH, 4, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 3, 1, 5])
    per = GLOBAL_BATCH // world
    mine = slice(rank * per, (rank + 1) * per)
    taps = model.backbone(video[mine].flatten(0, 1))  # as RecognitionTask.forward
    logits = engine(video[mine], taps)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[mine])
    engine.backward(loss)
    engine.step()


def snapshot(engine, **extra) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    from s4v.train.checkpoint import _base_optimizer, _link_optimizer_state, fp32_state

    _link_optimizer_state(engine)
    moments = {f"{name}/{k}": safe_get_full_optimizer_state(p, k).float().cpu().clone()
               for name, p in engine.module.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    steps = {float(s["step"]) for s in _base_optimizer(engine).state.values()}
    return {"params": fp32_state(engine), "moments": moments, "adam_steps": sorted(steps),
            "lr": [g["lr"] for g in engine.optimizer.param_groups], "global_steps": engine.global_steps, **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", required=True)
    ap.add_argument("--load")
    ap.add_argument("--save")
    ap.add_argument("--export", action="store_true")
    args = ap.parse_args()

    from s4v.train import checkpoint
    from s4v.train.dist import init_distributed

    info = init_distributed("gloo")
    out = Path(args.out)
    model, engine = build(args.stage, args.dtype, info.world_size)
    if args.load:
        client, rank_states = checkpoint.load(engine, Path(args.load))
        snap = snapshot(engine, rank_states=len(rank_states), client_step=client["step"])
        if info.is_main:
            torch.save(snap, out / "loaded.pt")
    else:
        for _ in range(2):
            step(model, engine, info.rank, info.world_size)
        snap = snapshot(engine)
        if args.save:
            checkpoint.save(engine, Path(args.save), 2, {"step": 2}, {"rank": info.rank}, keep=2)
        if info.is_main:
            torch.save(snap, out / "saved.pt")
    step(model, engine, info.rank, info.world_size)
    snap = snapshot(engine)
    if info.is_main:
        torch.save(snap, out / "next.pt")
    if args.export:  # as RecognitionTask.export does
        from s4v.model.checkpoint_io import save_model
        from s4v.train.tasks import _export

        trainer = SimpleNamespace(engine=engine, model=model, info=info, run_dir=out,
                                  ckpt_dir=Path(args.save or out / "checkpoints"))
        path = _export(trainer, lambda path: save_model(model, path, include_backbone=True))
        if info.is_main:
            os.replace(path, out / "model.pt")
            torch.save(snap["params"], out / "masters.pt")

if __name__ == "__main__":
    main()
