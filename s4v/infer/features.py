"""Features of a batch of test views, by level, for recognition and retrieval models.

- recognition: the side network's tokens after the head's BatchNorm (what the classifier pools):
  `clip` [D] (mean over frames and tokens, the classifier's input), `frame` [T, D], `tokens` [V, T, N, D];
- retrieval: the video embeddings: `frame` [T, E] (per-frame embeddings, what WTI scores; s4v search
  needs this level), `clip` [E] (normalised mean of the normalised frames, the `mean` interaction's
  video vector), `tokens` [V, T, N, D] (side tokens).

`clip` and `frame` average the V test views; `tokens` keeps them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = ("clip", "frame", "tokens")


def _side_tokens(model, video: torch.Tensor) -> torch.Tensor:
    """`[B, T, N, D]` side-network tokens (recognition: after the head's BN)."""
    b, t = video.shape[:2]
    s = model.side(video, model.backbone(video.flatten(0, 1)))
    bn = getattr(getattr(model, "head", None), "bn", None)
    if bn is not None:
        s = bn(s)
    return s.reshape(b, t, -1, s.shape[-1])


@torch.no_grad()
def video_features(model, video: torch.Tensor, views: int, level: str) -> torch.Tensor:
    """`video` `[B*V, T, 3, S, S]` (a video's views adjacent) -> `[B, ...]` float32 features (module doc)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    model.check_input(video)
    b = video.shape[0] // views
    if level == "tokens":
        tok = _side_tokens(model, video).float()
        return tok.view(b, views, *tok.shape[1:])
    if hasattr(model, "encode_video"):  # retrieval
        frames = model.encode_video(video).float()  # [B*V, T, E]
        frames = frames.view(b, views, *frames.shape[1:]).mean(1)
        return frames if level == "frame" else F.normalize(F.normalize(frames, dim=-1).mean(1), dim=-1)
    per_frame = _side_tokens(model, video).float().mean(2)  # [B*V, T, D]
    per_frame = per_frame.view(b, views, *per_frame.shape[1:]).mean(1)
    return per_frame if level == "frame" else per_frame.mean(1)


@torch.no_grad()
def text_features(model, texts: list[str], max_words: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(token features `[A, L, E]` float32, token ids `[A, L]`) of a retrieval model's text tower."""
    from s4v.model.retrieval import tokenize_for

    device = next(model.text.parameters()).device
    ids = tokenize_for(model.spec, texts, max_words).to(device)
    tokens, _ = model.encode_text(ids)
    return tokens.float().cpu(), ids.cpu()
