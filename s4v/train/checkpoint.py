"""Training checkpoints through the DeepSpeed engine, with the client state needed to resume exactly.

Layout of `<run_dir>/checkpoints/`: one folder per tag (`step_00001234`) and `latest`, a text file
naming the newest tag. A save never writes into an existing tag folder:

1. every rank writes into a fresh `step_N.tmp-<token>` folder (DeepSpeed's files, plus rank 0's
   `fp32_state.pt`: the full fp32 master weights and optimizer moments by parameter name, which a
   job with another world size loads);
2. every rank fsyncs the folder's files; after a barrier rank 0 writes `COMPLETE`, a JSON manifest of
   every file and its size, then renames the folder to `step_N` (an older `step_N` is moved aside
   first and removed afterwards) and replaces `latest` atomically;
3. the last `keep` checkpoints are kept; unfinished folders of crashed saves are removed.

Loading checks the manifest: a checkpoint whose files are missing or truncated is skipped with a
warning (`train.resume=auto`) or refused (an explicit tag).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from s4v.fileio import atomic_torch_save, atomic_write_bytes
from s4v.train.dist import all_gather_object, barrier, broadcast_object

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
CONSOLIDATED = "fp32_state.pt"
MANIFEST_FORMAT = "s4v-checkpoint-manifest"
_TAG = re.compile(r"^step_(\d{8})(\.(tmp|old)-[0-9a-f]+)?$")


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------- folders, tags
def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def verify(folder: Path) -> Optional[str]:
    """None if `folder` is a complete checkpoint whose files match its manifest, else what is wrong."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (an unfinished save)"
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None  # a checkpoint of an older s4v ("ok"): complete, but without a list to check
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, COMPLETE lists {size} (truncated?)"
    return None


def _step(name: str) -> Optional[int]:
    m = _TAG.match(name)
    return int(m.group(1)) if m else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Folders with a COMPLETE marker, oldest first (not verified; see `verify`). A step whose `step_N`
    folder is missing (a crash between the two renames of a re-save) is represented by its complete
    temporary folder."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    by_step: dict[int, str] = {}
    for p in sorted(ckpt_dir.iterdir(), key=lambda p: p.name):
        step = _step(p.name)
        if step is None or not p.is_dir() or not (p / COMPLETE).is_file():
            continue
        if p.name == tag_for(step) or step not in by_step:  # the final folder wins
            by_step[step] = p.name
    return [by_step[s] for s in sorted(by_step)]


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names if it is complete; else the newest complete one (or None)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    tags = complete_tags(ckpt_dir)
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag in tags:
            return tag
        log.warning("%s names %s, which is incomplete; using the newest complete checkpoint", latest, tag)
    return tags[-1] if tags else None


def resolve_resume(path: str | os.PathLike) -> tuple[Path, Optional[str]]:
    """`train.resume` as (checkpoints folder, tag or None for the newest intact one). Accepts a tag
    folder (`.../checkpoints/step_N`), a checkpoints folder, or a run folder holding `checkpoints/`."""
    path = Path(path)
    if (path / COMPLETE).is_file() or _step(path.name) is not None:
        if not path.is_dir():
            raise CheckpointError(f"train.resume: no checkpoint folder {path}")
        return path.parent, path.name
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.is_dir() and ((path / "latest").is_file() or complete_tags(path)):
        return path, None
    raise CheckpointError(f"train.resume: {path} is neither a checkpoint folder (step_N), a checkpoints "
                          "folder nor a run folder with checkpoints")


def _fsync_files(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(folder: Path, world_size: int) -> bytes:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    return json.dumps({"format": MANIFEST_FORMAT, "version": 1, "world_size": world_size,
                       "files": files}, indent=1).encode()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _write_failed(err: Exception) -> bool:
    """An I/O failure while writing: an OSError, or torch.save's zip writer, which reports a full disk or
    quota as a RuntimeError ("[enforce fail at inline_container.cc] ... unexpected pos" or "PytorchStreamWriter
    failed writing file")."""
    text = str(err)
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and
                                        ("inline_container" in text or "PytorchStreamWriter" in text))


def _full_disk_message(err: Exception, ckpt_dir: Path, tag: str, previous: Optional[str], engine) -> str:
    reason = str(err) if isinstance(err, OSError) else f"a file write failed (torch.save: {err})"
    try:
        free = f"{_size(shutil.disk_usage(ckpt_dir).free)} free"
    except OSError:
        free = "free space unknown"
    if previous is not None:
        need = _folder_bytes(ckpt_dir / previous)
    else:  # fp32 master + 2 Adam moments (+ the consolidated copy) + module weights
        need = sum(p.numel() for p in engine.module.parameters()) * (4 * 3 * 2 + 4)
    return (f"could not write checkpoint {tag} in {ckpt_dir}: {reason} ({free}; a checkpoint takes about "
            f"{_size(need)}). The previous checkpoint ({previous or 'none'}) is intact; free "
            "space and resume.")


# ------------------------------------------------------------------------------------------------ save
def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep: int) -> str:
    """Save on every rank and return the tag. `rank_state` (data position, RNG) is gathered, so the
    checkpoint holds every rank's. Raises `CheckpointError` (the previous checkpoint intact) on an
    I/O error such as a full disk."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    is_main = engine.global_rank == 0
    state = dict(client_state, rank_states=all_gather_object(rank_state), world_size=engine.world_size)
    work = f"{tag}.tmp-{broadcast_object(secrets.token_hex(4))}"  # the same folder on every rank
    previous = latest_tag(ckpt_dir)
    try:
        consolidated = consolidated_state(engine)  # a collective: every rank
        engine.save_checkpoint(str(ckpt_dir), tag=work, client_state=state, save_latest=False)
        if is_main:
            atomic_torch_save(dict(consolidated, client_state=state), ckpt_dir / work / CONSOLIDATED)
        barrier()  # every file written: then each rank flushes them all (its own included), cheaply
        _fsync_files(ckpt_dir / work)
        barrier()
        if is_main:
            atomic_write_bytes(ckpt_dir / work / COMPLETE, _manifest(ckpt_dir / work, engine.world_size))
            _publish(ckpt_dir, work, tag, keep)
    except Exception as err:  # full disk, quota, permissions: the previous checkpoint is kept
        if not _write_failed(err):
            raise
        shutil.rmtree(ckpt_dir / work, ignore_errors=True)
        raise CheckpointError(_full_disk_message(err, ckpt_dir, tag, previous, engine)) from err
    barrier()
    return tag


def _publish(ckpt_dir: Path, work: str, tag: str, keep: int) -> None:
    """Rank 0: rename the finished `work` folder to `tag` (an older `tag` folder, from a save at the
    same step, is moved aside first), point `latest` at it, prune."""
    final = ckpt_dir / tag
    aside = None
    if final.exists():
        aside = ckpt_dir / f"{tag}.old-{secrets.token_hex(4)}"
        final.rename(aside)
    (ckpt_dir / work).rename(final)
    _fsync_dir(ckpt_dir)
    atomic_write_bytes(ckpt_dir / "latest", (tag + "\n").encode())
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    others = [t for t in complete_tags(ckpt_dir) if t == tag_for(_step(t)) and t != tag]
    for old in others[:max(0, len(others) - (keep - 1))] if keep > 0 else []:  # the new tag is always kept
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    for other in ckpt_dir.iterdir():  # leftovers of crashed saves: temporary or unfinished folders
        step = _step(other.name)
        if step is not None and other.is_dir() and (other.name != tag_for(step) or not (other / COMPLETE).is_file()):
            shutil.rmtree(other, ignore_errors=True)


def set_aside_newer(ckpt_dir: Path, step: int) -> list[str]:
    """Rank 0, after resuming from step `step`: checkpoints of later steps belong to an abandoned
    continuation; move them to `checkpoints/abandoned/` so that neither pruning nor `resume=auto` mixes
    the two. Returns the tags moved."""
    ckpt_dir = Path(ckpt_dir)
    moved = [t for t in complete_tags(ckpt_dir) if _step(t) > step]
    if moved:
        (ckpt_dir / "abandoned").mkdir(exist_ok=True)
        for t in moved:
            (ckpt_dir / t).rename(ckpt_dir / "abandoned" / f"{t}-{secrets.token_hex(3)}")
        log.warning("resumed from step %d: later checkpoints %s moved to %s", step, ", ".join(moved),
                    ckpt_dir / "abandoned")
    return moved


# ------------------------------------------------------------------------------------------------ load
def load(engine, ckpt_dir: Path, tag: Optional[str] = None
         ) -> Optional[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Load `tag`, or (None) the newest intact checkpoint, skipping broken ones with a warning.
    Returns (client_state, every saved rank's state), or None when there is no checkpoint. The saved
    ranks may be more or fewer than this job's (the loop re-deals the data): a checkpoint written by
    another number of ranks is loaded from its consolidated fp32 state."""
    ckpt_dir = Path(ckpt_dir)
    folder = broadcast_object(_choose(ckpt_dir, tag) if engine.global_rank == 0 else None)
    if isinstance(folder, CheckpointError):
        raise folder
    if folder is None:
        return None
    path = ckpt_dir / folder
    written_by = _written_by(path)
    try:
        if written_by is not None and written_by != engine.world_size:
            log.info("checkpoint %s was written by %d ranks, this job has %d: loading its consolidated "
                     "fp32 state", path, written_by, engine.world_size)
            client_state = load_consolidated(engine, path / CONSOLIDATED)
        else:
            loaded, client_state = engine.load_checkpoint(str(ckpt_dir), tag=folder, load_module_strict=True)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    except CheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(err).__name__}: {err}") from err
    log.info("loaded checkpoint %s", path)
    return client_state, client_state.get("rank_states", [])


def _written_by(path: Path) -> Optional[int]:
    try:
        return json.loads((path / COMPLETE).read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None  # an older checkpoint: the same world size is assumed (DeepSpeed checks)


def _choose(ckpt_dir: Path, tag: Optional[str]) -> Optional[str] | CheckpointError:
    """Rank 0's pick of the folder to load (an error is returned, to be raised on every rank)."""
    if tag is not None:
        problem = verify(ckpt_dir / tag)
        return CheckpointError(f"checkpoint {ckpt_dir / tag} is broken: {problem}") if problem else tag
    candidates = complete_tags(ckpt_dir)
    preferred = latest_tag(ckpt_dir)
    if preferred in candidates:  # `latest` first, then the older ones, newest first
        candidates = candidates[:candidates.index(preferred) + 1]
    broken = []
    for name in reversed(candidates):
        problem = verify(ckpt_dir / name)
        if problem is None:
            return name
        log.warning("checkpoint %s is broken (%s); trying the next older one", ckpt_dir / name, problem)
        broken.append(f"{name}: {problem}")
    if broken:
        return CheckpointError(f"no intact checkpoint in {ckpt_dir} ({'; '.join(broken)}); remove the broken "
                               "ones to start afresh, or set train.resume=none")
    return None


# --------------------------------------------------------------------- fp32 state by parameter name
def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO wrappers hold the torch optimizer


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2: point every parameter's view of the optimizer state at the current state tensors.
    DeepSpeed links them once, after the first step of the first parameter group, when the other
    groups' (lazily created) states do not exist yet, so `safe_*_optimizer_state` would fail."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    if not hasattr(opt, "single_partition_of_fp32_groups"):
        return  # ZeRO-3 reads the optimizer state directly
    for lp_params, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
        if flat in opt.optimizer.state:
            lazy_init_hp_params_optimizer_state(lp_params, flat, opt.optimizer.state)


def fp32_state(engine, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The engine's fp32 master weights by parameter name, on the CPU (all ranks must call it: ZeRO
    gathers the partitions; with `rank0_only` the other ranks return {}). Without a ZeRO master copy,
    the module's own weights in float32."""
    from deepspeed.utils import safe_get_full_fp32_param

    keep = not rank0_only or engine.global_rank == 0
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if keep:
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def consolidated_state(engine) -> dict[str, Any]:
    """Everything trainable, by parameter name and independent of the world size: fp32 master weights,
    optimizer moments and step, buffers, LR scheduler, the engine's counters. A collective; the
    tensors are kept on rank 0 only."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    first = next((s for s in base.state.values() if s), None)  # empty before the first step
    keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0) if first else []
    moments: dict[str, dict[str, torch.Tensor]] = {}
    if keys:
        _link_optimizer_state(engine)
    keep = engine.global_rank == 0  # the others only take part in the gathers
    for name, p in engine.module.named_parameters():
        if p.requires_grad and keys:
            full = {k: safe_get_full_optimizer_state(p, k) for k in keys}
            if keep:
                moments[name] = {k: v.float().cpu().clone() for k, v in full.items()}
    step = first.get("step") if first else None
    return {"format": "s4v-fp32-state", "params": fp32_state(engine, rank0_only=True),
            "buffers": {k: v.detach().cpu().clone() for k, v in engine.module.named_buffers()},
            "optimizer": moments, "optimizer_step": step.clone() if torch.is_tensor(step) else step,
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "counters": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")}}


def load_consolidated(engine, path: Path) -> dict[str, Any]:
    """Load a `consolidated_state` file into a freshly initialised engine of any world size (every rank
    calls it); returns the client state saved with it."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(engine.module.named_parameters())
    if sorted(params) != sorted(state["params"]):
        missing, extra = set(params) - set(state["params"]), set(state["params"]) - set(params)
        raise CheckpointError(f"{path} does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}")
    if state["optimizer"]:
        _init_optimizer_state(engine, state)
    zero3 = engine.zero_optimization_stage() == 3
    for name, p in params.items():
        value = state["params"][name]
        if p.requires_grad:
            safe_set_full_fp32_param(p, value.to(p.device))
            for key, moment in state["optimizer"].get(name, {}).items():
                safe_set_full_optimizer_state(p, moment.to(p.device), key)
        # The module's own (low-precision) weights: ZeRO copies master -> module only after a step.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else contextlib.nullcontext():
            with torch.no_grad():
                p.data.copy_(value.to(p.dtype).view_as(p.data))
    buffers = dict(engine.module.named_buffers())
    with torch.no_grad():
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
    if state["scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for key, value in state["counters"].items():
        setattr(engine, key, value)
    return state["client_state"]


def _init_optimizer_state(engine, state: dict[str, Any]) -> None:
    """Create the base optimizer's per-partition state (empty before the first step) with the saved
    step count, so that the moments can be set."""
    base = _base_optimizer(engine)
    keys = sorted(next(iter(state["optimizer"].values())))
    step = state["optimizer_step"]
    opt = engine.optimizer  # the fp32 partitions the base optimizer steps (ZeRO-3, ZeRO-1/2, none)
    flats = (getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None)
             or [p for group in base.param_groups for p in group["params"]])
    for flat in flats:
        entry = base.state[flat]
        entry["step"] = step.clone() if torch.is_tensor(step) else step
        for key in keys:
            entry[key] = torch.zeros_like(flat)
    _link_optimizer_state(engine)
