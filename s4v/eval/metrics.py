"""Recognition metrics as pure functions of scores and labels."""
from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores. `scores` `[N, C]`, `labels` `[N]`.
    Ties are broken by class index (torch.topk order), as in the official test script."""
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels.unsqueeze(1)
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[C, C]` counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_class_accuracy(confusion: torch.Tensor) -> float:
    """Mean over classes present in the labels of per-class recall."""
    per_class = confusion.diag().float() / confusion.sum(1).float()
    present = confusion.sum(1) > 0
    return per_class[present].mean().item() if present.any() else float("nan")


def accuracy_report(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1, top-5, mean class accuracy and the confusion matrix of `[N, C]` scores."""
    acc = topk_accuracy(scores, labels, (1, 5))
    confusion = confusion_matrix(scores.argmax(1), labels, num_classes)
    return {"top1": acc[1], "top5": acc[5], "mean_class_acc": mean_class_accuracy(confusion),
            "num_samples": int(labels.numel()), "confusion": confusion}
