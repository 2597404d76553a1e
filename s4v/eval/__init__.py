"""Evaluation: recognition accuracy (multi-view) and, later, retrieval metrics."""
from .metrics import accuracy_report, confusion_matrix, topk_accuracy  # noqa: F401
