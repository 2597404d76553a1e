"""The retrieval models' view of the one model table (`s4v.model.registry`), kept for callers of the
old layout: a retrieval model is a `ModelSpec` with a text tower."""
from __future__ import annotations

from .registry import RETRIEVAL as RETRIEVAL_MODELS  # noqa: F401
from .specs import ModelSpec, RetrievalSpec, TextSpec, apply_overrides, closest  # noqa: F401


def get_retrieval_spec(name: str) -> ModelSpec:
    if name not in RETRIEVAL_MODELS:
        raise ValueError(f"unknown retrieval model {name!r}" + closest(name, RETRIEVAL_MODELS))
    return RETRIEVAL_MODELS[name]


apply_retrieval_overrides = apply_overrides
