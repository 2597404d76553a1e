"""Text-video similarity (docs/method.md 5.3): weighted token-wise interaction (WTI, from DRL) and mean pooling.

Both are split into a *prepare* step (per text / per video: L2-normalised features and softmax weights,
which need the learned weight heads) and a *score* step that is a pure function of prepared tensors,
so a large test set is scored in blocks without the model (`score_in_blocks`).

Score of text a (tokens i, weights wt, mask) and video b (frames j, weights wv), S[a,b,i,j] = <t_ai, v_bj>
with padded text tokens set to 0:

    t2v[a,b] = sum_i wt_ai * max_j S[a,b,i,j]
    v2t[a,b] = sum_j wv_bj * max_i S[a,b,i,j]      (padded tokens take part in the max with S = 0, as DRL)
    score[a,b] = (t2v + v2t) / 2

"mean" (CLIP4Clip meanP) is the same formula with one token (the EOT feature) and one frame (the
normalised mean of the normalised frames), i.e. cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Interaction = Literal["wti", "mean"]


@dataclass
class TextEmbedding:
    feats: torch.Tensor  # [A, L, E] L2-normalised; padded tokens are zero
    mask: torch.Tensor  # [A, L] bool
    weights: torch.Tensor  # [A, L] softmax over valid tokens (0 on padding)

    def __getitem__(self, idx) -> "TextEmbedding":
        return TextEmbedding(self.feats[idx], self.mask[idx], self.weights[idx])

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.feats.to(device), self.mask.to(device), self.weights.to(device))

    def __len__(self) -> int:
        return self.feats.shape[0]


@dataclass
class VideoEmbedding:
    feats: torch.Tensor  # [B, T, E] L2-normalised
    weights: torch.Tensor  # [B, T] softmax over frames

    def __getitem__(self, idx) -> "VideoEmbedding":
        return VideoEmbedding(self.feats[idx], self.weights[idx])

    def to(self, device) -> "VideoEmbedding":
        return VideoEmbedding(self.feats.to(device), self.weights.to(device))

    def __len__(self) -> int:
        return self.feats.shape[0]


def _weight_head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))


class TokenInteraction(nn.Module):
    """WTI weight heads (`text_weight_fc`, `video_weight_fc`: Linear-ReLU-Linear) or plain mean pooling."""

    def __init__(self, dim: int, mode: Interaction = "wti"):
        super().__init__()
        if mode not in ("wti", "mean"):
            raise ValueError(f"interaction must be 'wti' or 'mean', got {mode!r}")
        self.mode = mode
        self.text_weight_fc = _weight_head(dim) if mode == "wti" else None
        self.video_weight_fc = _weight_head(dim) if mode == "wti" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP4Clip's `init_weights` for new modules: Linear ~ N(0, 0.02), bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prepare_text(self, tokens: torch.Tensor, mask: torch.Tensor, eot_index: torch.Tensor) -> TextEmbedding:
        """`tokens` `[A, L, E]` (all projected token features), `mask` `[A, L]`, `eot_index` `[A]`."""
        tokens = tokens.float()
        if self.mode == "mean":
            eot = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot_index]
            feats = F.normalize(eot, dim=-1).unsqueeze(1)
            ones = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            return TextEmbedding(feats, ones, ones.float())
        logits = self.text_weight_fc(tokens.to(self.text_weight_fc[0].weight.dtype)).squeeze(-1).float()
        weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        feats = F.normalize(tokens, dim=-1) * mask.unsqueeze(-1)
        return TextEmbedding(feats, mask, weights)

    def prepare_ids(self, tokens: torch.Tensor, ids: torch.Tensor) -> TextEmbedding:
        """`prepare_text` for CLIP token `ids` `[A, L]`: padding is id 0, the EOT token has the largest id."""
        return self.prepare_text(tokens, ids != 0, ids.argmax(dim=-1))

    def prepare_video(self, frames: torch.Tensor) -> VideoEmbedding:
        """`frames` `[B, T, E]` per-frame embeddings (the video mask is all ones, as the official code)."""
        frames = frames.float()
        if self.mode == "mean":
            feats = F.normalize(F.normalize(frames, dim=-1).mean(1), dim=-1).unsqueeze(1)
            return VideoEmbedding(feats, torch.ones(feats.shape[:2], device=feats.device))
        logits = self.video_weight_fc(frames.to(self.video_weight_fc[0].weight.dtype)).squeeze(-1).float()
        return VideoEmbedding(F.normalize(frames, dim=-1), logits.softmax(-1))


def token_wise_score(text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
    """`[A, B]` WTI scores of prepared texts and videos (module doc). Memory: A*B*L*T floats."""
    s = torch.einsum("ale,bte->ablt", text.feats, video.feats)  # padded tokens are 0 already
    t2v = torch.einsum("abl,al->ab", s.amax(dim=3), text.weights)
    v2t = torch.einsum("abt,bt->ab", s.amax(dim=2), video.weights)
    return (t2v + v2t) / 2


@torch.no_grad()
def score_in_blocks(text: TextEmbedding, video: VideoEmbedding, block_texts: int = 256, block_videos: int = 256,
                    device=None, rows: range | None = None) -> torch.Tensor:
    """`[A, B]` (or `[len(rows), B]`) scores on the CPU, computed `block_texts x block_videos` at a time
    on `device` (default: where the embeddings are), so that only one block's `L x T` products exist."""
    device = torch.device(device) if device is not None else text.feats.device
    rows = rows if rows is not None else range(len(text))
    out = torch.empty(len(rows), len(video), dtype=torch.float32)
    for a0 in range(0, len(rows), block_texts):
        idx = torch.tensor(rows[a0:a0 + block_texts], dtype=torch.long)
        t = text[idx].to(device)
        for b0 in range(0, len(video), block_videos):
            v = video[b0:b0 + block_videos].to(device)
            out[a0:a0 + len(idx), b0:b0 + len(v)] = token_wise_score(t, v).float().cpu()
    return out
