"""Training checkpoints through the DeepSpeed engine, with the client state needed to resume exactly.

Layout of `<run_dir>/checkpoints/`: one folder per tag (`step_00001234`), each finished by a
`COMPLETE` marker written after every rank has saved; `latest` (a text file naming the tag) is
replaced atomically only then, so a crash mid-save never leaves a `latest` pointing at a partial
checkpoint. The last `keep` complete checkpoints are kept.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from s4v.fileio import atomic_write_bytes
from s4v.train.dist import all_gather_object, barrier

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


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


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names if it is complete; else the newest complete one (or None)."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
        log.warning("%s names %s, which is incomplete; using the newest complete checkpoint", latest, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep: int) -> str:
    """Save on every rank; `rank_state` (data position, RNG) is gathered so each rank gets its own back."""
    tag = tag_for(step)
    state = dict(client_state, rank_states=all_gather_object(rank_state))
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    except BaseException:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # never leave a partial folder behind
        raise
    barrier()
    if engine.global_rank == 0:
        atomic_write_bytes(ckpt_dir / tag / COMPLETE, b"ok\n")
        atomic_write_bytes(ckpt_dir / "latest", (tag + "\n").encode())
        for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for partial in ckpt_dir.iterdir():  # leftovers of a crashed save
            if partial.is_dir() and not (partial / COMPLETE).is_file() and partial.name != tag:
                shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: Optional[str] = None) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """Load `tag` (default: the latest complete one). Returns (client_state, this rank's state) or None."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_states = client_state.get("rank_states", [])
    if len(rank_states) != engine.world_size:
        raise RuntimeError(f"checkpoint {tag} was written by {len(rank_states)} ranks, this job has "
                           f"{engine.world_size}; the exact data position cannot be restored")
    return client_state, rank_states[engine.global_rank]
