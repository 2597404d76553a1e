"""Text-video retrieval metrics and the distributed retrieval evaluation.

`retrieval_metrics(sim, text_to_video)` is a pure function of a `[num_texts, num_videos]` similarity
matrix:

- text-to-video (T2V): every text is a query, ranked against all videos; its correct video is
  `text_to_video[i]` (the diagonal when `sim` is square and no index is given);
- video-to-text (V2T): every video is a query against the *caption groups* of all videos, a group
  scoring its best caption (CLIP4Clip's multi-sentence protocol: `max` over each video's captions,
  then the rank of the query's own group). With one caption per video this is plain V2T on `sim.T`.
  Videos without any caption are T2V candidates only (neither V2T queries nor groups).

Recall@K is a percentage (0-100, as in the paper's tables); MdR / MnR are the median (numpy
convention: the mean of the two middle values for an even count) and mean of the 1-based ranks.

Ties: rank = 1 + (number of candidates scoring strictly higher) + a tie term over the *other*
candidates with exactly the query's correct score: `pessimistic` (default) counts all of them, so a
constant similarity matrix ranks every query last and can never look good; `optimistic` counts none;
`mean` counts half (the expected rank under random tie-breaking). CLIP4Clip's argsort order is
arbitrary among ties. NaN scores count as -inf.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Literal, Optional

import torch
import torch.distributed as dist

Ties = Literal["pessimistic", "optimistic", "mean"]
KS = (1, 5, 10)

log = logging.getLogger(__name__)


def ranks_of(sim: torch.Tensor, target: torch.Tensor, ties: Ties = "pessimistic") -> torch.Tensor:
    """1-based rank of column `target[i]` in row i of `sim` `[Q, C]` (float; `mean` ties give .5)."""
    sim = torch.nan_to_num(sim.float(), nan=float("-inf"))
    correct = sim.gather(1, target.long().view(-1, 1))
    higher = (sim > correct).sum(1)
    equal = (sim == correct).sum(1) - 1  # the other candidates tied with the correct one
    if ties == "pessimistic":
        extra = equal.float()
    elif ties == "optimistic":
        extra = torch.zeros_like(equal, dtype=torch.float32)
    elif ties == "mean":
        extra = equal.float() / 2
    else:
        raise ValueError(f"ties must be 'pessimistic', 'optimistic' or 'mean', got {ties!r}")
    return 1.0 + higher.float() + extra


def rank_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    if ranks.numel() == 0:
        nan = float("nan")
        return {**{f"{prefix}_r{k}": nan for k in KS}, f"{prefix}_medr": nan, f"{prefix}_meanr": nan}
    r = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * (r <= k).double().mean().item() for k in KS}
    s = r.sort().values
    n = s.numel()
    out[f"{prefix}_medr"] = float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)
    out[f"{prefix}_meanr"] = r.mean().item()
    return out


def retrieval_metrics(sim: torch.Tensor, text_to_video: Optional[torch.Tensor] = None,
                      ties: Ties = "pessimistic") -> dict[str, float]:
    """T2V and V2T R@1/5/10 (%), median and mean rank of a `[num_texts, num_videos]` similarity matrix.

    `text_to_video` `[num_texts]` holds each text's video index; None means the diagonal (square
    `sim`). Returns `t2v_r1, t2v_r5, t2v_r10, t2v_medr, t2v_meanr`, the same for `v2t_`, and
    `num_texts`, `num_videos`. See the module doc for the multi-caption V2T protocol and the ties.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [num_texts, num_videos], got {tuple(sim.shape)}")
    num_texts, num_videos = sim.shape
    if text_to_video is None:
        if num_texts != num_videos:
            raise ValueError(f"sim is {num_texts}x{num_videos}: pass text_to_video for a non-square matrix")
        text_to_video = torch.arange(num_texts)
    text_to_video = torch.as_tensor(text_to_video, dtype=torch.long).view(-1).cpu()
    if text_to_video.numel() != num_texts:
        raise ValueError(f"text_to_video has {text_to_video.numel()} entries for {num_texts} texts")
    if num_texts and (text_to_video.min() < 0 or text_to_video.max() >= num_videos):
        raise ValueError("text_to_video holds an index outside [0, num_videos)")
    sim = torch.nan_to_num(sim.detach().float().cpu(), nan=float("-inf"))
    out = rank_summary(ranks_of(sim, text_to_video, ties), "t2v")
    # V2T: group captions by video, a group scores its best caption for the query video.
    groups = torch.full((num_videos, num_videos), float("-inf"))  # [query video, caption group]
    groups.scatter_reduce_(1, text_to_video.view(1, -1).expand(num_videos, -1), sim.t().contiguous(), reduce="amax")
    has_caption = torch.zeros(num_videos, dtype=torch.bool)
    has_caption[text_to_video] = True
    keep = has_caption.nonzero().view(-1)
    v2t = groups[keep][:, keep]
    out.update(rank_summary(ranks_of(v2t, torch.arange(keep.numel()), ties), "v2t"))
    out.update(num_texts=num_texts, num_videos=num_videos)
    return out


# ---------------------------------------------------------------------------- distributed evaluation
@torch.no_grad()
def embed_split(encode_video: Callable, encode_texts: Callable, batches: Iterable[dict], captions,
                device: torch.device, progress: bool = False) -> dict[str, tuple]:
    """This rank's share of the test set, on the CPU: key -> (video feats `[T, E]`, video weights `[T]`,
    None or the video's captions as (feats `[n, L', E]` fp16, mask `[n, L']`, weights `[n, L']`)).

    `encode_video(video [B, T, 3, H, W]) -> VideoEmbedding`, `encode_texts(list[str]) -> TextEmbedding`
    (both prepared, see s4v.model.wti); `captions.all(key)` lists a video's captions. Multi-view
    batches (`[B, V, T, ...]`) average the per-frame features over the views. Token columns past the
    longest caption are cut, keeping one padding column (scores are unchanged: module doc of wti.py).
    """
    from tqdm import tqdm

    out: dict[str, tuple] = {}
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
        video = batch["video"].to(device, non_blocking=True)
        views = video.shape[1] if video.dim() == 6 else 1
        emb = encode_video(video.flatten(0, 1) if video.dim() == 6 else video)
        feats_v = emb.feats.float().view(-1, views, *emb.feats.shape[1:]).mean(1)
        weights_v = emb.weights.float().view(-1, views, emb.weights.shape[-1]).mean(1)
        if views > 1:
            feats_v = torch.nn.functional.normalize(feats_v, dim=-1)
        valid = batch["valid"].tolist() if "valid" in batch else [True] * len(batch["key"])
        new = {}  # key -> row, in batch order, first occurrence
        for i, (key, ok) in enumerate(zip(batch["key"], valid)):
            if ok and key not in out and key not in new:  # padding/failed slots hold copies of others
                new[key] = i
        caps = {key: list(captions.all(key)) for key in new}
        flat = [c for key in new for c in caps[key]]
        # Every rank runs the text tower once per batch, even without new captions: under ZeRO-3 its
        # weights are gathered collectively, so all ranks must make the same calls.
        t = encode_texts(flat or [""])
        start = 0
        for key, i in new.items():
            n = len(caps[key])
            text_part = None
            if n:
                feats, mask, w = t.feats[start:start + n], t.mask[start:start + n], t.weights[start:start + n]
                width = min(mask.shape[1], int(mask.sum(1).max()) + 1)
                text_part = (feats[:, :width].half().cpu(), mask[:, :width].cpu(), w[:, :width].float().cpu())
            start += n
            out[key] = (feats_v[i].cpu(), weights_v[i].cpu(), text_part)
    return out


def _pad_tokens(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    pad = x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def assemble(parts: list[dict[str, tuple]]):
    """Merge the ranks' parts into (sorted keys, VideoEmbedding, TextEmbedding, text_to_video)."""
    from s4v.model.wti import TextEmbedding, VideoEmbedding

    merged: dict[str, tuple] = {}
    for part in parts:
        merged.update(part)
    keys = sorted(merged)
    if not keys:
        raise RuntimeError("retrieval evaluation saw no videos: is the validation split empty?")
    video = VideoEmbedding(torch.stack([merged[k][0] for k in keys]).float(),
                           torch.stack([merged[k][1] for k in keys]).float())
    texts = [(vi, merged[k][2]) for vi, k in enumerate(keys) if merged[k][2] is not None]
    if not texts:
        raise RuntimeError("retrieval evaluation found no captions for the test videos")
    width = max(tp[0].shape[1] for _, tp in texts)
    text = TextEmbedding(torch.cat([_pad_tokens(tp[0].float(), width) for _, tp in texts]),
                         torch.cat([_pad_tokens(tp[1], width) for _, tp in texts]),
                         torch.cat([_pad_tokens(tp[2], width) for _, tp in texts]))
    owner = torch.tensor([vi for vi, tp in texts for _ in range(tp[0].shape[0])], dtype=torch.long)
    return keys, video, text, owner


def evaluate_retrieval(encode_video: Callable, encode_texts: Callable, batches: Iterable[dict], captions,
                       device: torch.device, progress: bool = False, ties: Ties = "pessimistic",
                       block: int = 256) -> dict:
    """Embed this rank's videos and their captions, gather every rank's, score the texts in blocks
    (text rows split over the ranks), and compute `retrieval_metrics` with the count and first keys of
    the videos that could not be read (s4v.eval.skips). Every rank returns the report."""
    from s4v.eval.skips import SkipCounter, gather_unreadable, skip_fields
    from s4v.model.wti import score_in_blocks
    from s4v.train.dist import all_gather_object

    skips = SkipCounter(batches)
    parts = all_gather_object(embed_split(encode_video, encode_texts, batches, captions, device, progress))
    unreadable = gather_unreadable(skips.local(), [k for part in parts for k in part])
    keys, video, text, owner = assemble(parts)
    world = len(parts)
    rank = dist.get_rank() if world > 1 else 0
    rows = range(rank, len(text), world)
    score_device = device if device.type == "cuda" else torch.device("cpu")
    mine = score_in_blocks(text, video, block, block, device=score_device, rows=rows)
    sim = torch.empty(len(text), len(video))
    for r, part in enumerate(all_gather_object(mine) if world > 1 else [mine]):
        sim[r::world] = part
    report = retrieval_metrics(sim, owner, ties)
    report.update(skip_fields(len(keys), unreadable))
    report["keys"] = keys
    return report
