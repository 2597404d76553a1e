"""Evaluation: recognition accuracy (multi-view) and text-video retrieval metrics."""
from .metrics import accuracy_report, confusion_matrix, topk_accuracy  # noqa: F401
from .retrieval import retrieval_metrics  # noqa: F401
