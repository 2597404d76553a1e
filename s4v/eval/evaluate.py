"""Multi-view recognition evaluation, distributed over ranks with exact de-duplication.

A batch holds `video` `[B, V, T, 3, H, W]` (V = spatial crops x temporal clips) or `[B, T, 3, H, W]`,
`label` `[B]`, `key` (sample keys) and `valid` (False for padding and failed samples). Softmax scores
are averaged over views (official test protocol). Ranks may see padded duplicates at the end of an
epoch; results are gathered by key, so every sample counts exactly once. The videos that failed to
read are counted and listed (s4v.eval.skips).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm import tqdm

from s4v.eval.metrics import accuracy_report
from s4v.eval.skips import EvalSkipError, SkipCounter, describe_unreadable, gather_unreadable, skip_fields
from s4v.train.dist import all_gather_object


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict], device: torch.device,
            progress: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """key -> (view-averaged softmax scores `[C]` on CPU, label) for this rank's batches."""
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
        video = batch["video"].to(device, non_blocking=True)
        views = video.shape[1] if video.dim() == 6 else 1
        flat = video.flatten(0, 1) if video.dim() == 6 else video
        probs = forward(flat).float().softmax(-1)
        probs = probs.view(-1, views, probs.shape[-1]).mean(1).cpu()
        valid = batch["valid"].tolist() if "valid" in batch else [True] * len(batch["key"])
        for key, p, label, ok in zip(batch["key"], probs, batch["label"].tolist(), valid):
            if ok:  # padding slots and samples that failed to decode hold copies of others
                out[key] = (p, int(label))
    return out


def gather_predictions(local: dict[str, tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All ranks' predictions, one per key (sorted by key)."""
    merged: dict[str, tuple[torch.Tensor, int]] = {}
    for part in all_gather_object(local):
        merged.update(part)
    keys = sorted(merged)
    if not keys:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), []
    scores = torch.stack([merged[k][0] for k in keys])
    labels = torch.tensor([merged[k][1] for k in keys])
    return scores, labels, keys


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict], num_classes: int,
             device: torch.device, progress: bool = False) -> dict:
    """Accuracy report over every rank's batches, with the count and first keys of the videos that could
    not be read (s4v.eval.skips: `num_samples`, `num_evaluated`, `num_unreadable`, `unreadable`)."""
    skips = SkipCounter(batches)
    scores, labels, keys = gather_predictions(predict(forward, batches, device, progress))
    unreadable = gather_unreadable(skips.local(), keys)
    if not keys:
        raise EvalSkipError("evaluation saw no readable samples: is the validation split empty?"
                            + (f" Unreadable: {describe_unreadable(skip_fields(0, unreadable))}" if unreadable else ""))
    report = accuracy_report(scores, labels, num_classes)
    report.update(skip_fields(len(keys), unreadable))
    report["keys"] = keys
    return report
