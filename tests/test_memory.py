"""Memory savings of the side network: same numbers with and without each switch, and the bytes saved
for backward (exact, via saved-tensor hooks) against the official model's per-clip figures."""
import functools

import pytest
import torch
from torch import nn

import s4v
from s4v.bench.memory import OFFICIAL_B16_MIB, OFFICIAL_LIKE, MiB, SavedTensorTracker
from s4v.model.side_net import RecognitionHead, SideNetwork
from s4v.model.specs import apply_overrides, get_spec

TINY = ["s4v_tiny", "s4v_tiny_eva"]


def _step(name, overrides, dtype=torch.float32, autocast=False, ckpt=False):
    return _cached_step(name, tuple(sorted(overrides.items())), dtype, autocast, ckpt)


@functools.lru_cache(maxsize=None)
def _cached_step(name, overrides, dtype, autocast, ckpt):
    """Logits, gradients and BN running stats of one training forward/backward."""
    overrides = dict(overrides)
    torch.manual_seed(0)
    model = s4v.create_model(name, 5, 4, backbone_dtype="bf16" if autocast else None, **overrides)
    if dtype == torch.float64:
        model.double()
    model.set_grad_checkpointing(ckpt)
    model.train()
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(2), dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.to(dtype) * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    stats = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return out.detach().to(dtype), grads, stats


def _compare(a, b, tol):
    (la, ga, sa), (lb, gb, sb) = a, b
    scale = max(g.abs().max().item() for g in ga.values())
    assert (la - lb).abs().max().item() <= tol * max(1.0, la.abs().max().item())
    for k in ga:
        assert (ga[k] - gb[k]).abs().max().item() <= tol * scale, k
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), atol=tol, rtol=0), k


SWITCHES = [("side.fused_taps", False), ("side.fused_norms", False), ("side.mlp_recompute", "none"),
            ("side.mlp_recompute", "fc1")]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("key,value", SWITCHES)
def test_each_saving_keeps_logits_and_gradients(name, key, value):
    """Each switch against the defaults: fp64 to rounding, fp32 to 1e-5, bf16 autocast close."""
    for dtype, autocast, tol in ((torch.float64, False, 1e-12), (torch.float32, True, 3e-2)):
        _compare(_step(name, {key: value}, dtype, autocast), _step(name, {}, dtype, autocast), tol)


@pytest.mark.parametrize("name", TINY)
def test_all_savings_off_and_checkpointing_match(name):
    """All savings off except SDPA (the official-like path) vs defaults, and defaults with
    checkpointing: the same numbers, BN running statistics updated once."""
    off = {k: v for k, v in OFFICIAL_LIKE.items() if k != "side.attention"}
    ref = _step(name, off, torch.float64)
    _compare(_step(name, {}, torch.float64), ref, 1e-12)
    _compare(_step(name, {}, torch.float64, ckpt=True), ref, 1e-12)
    _compare(_step(name, {"side.mlp_recompute": "fc1"}, torch.float64, ckpt=True), ref, 1e-12)


@pytest.mark.parametrize("name", TINY)
def test_math_attention_matches_sdpa(name):
    _compare(_step(name, {"side.attention": "math"}, torch.float64), _step(name, {}, torch.float64), 1e-12)
    _compare(_step(name, {"side.attention": "math"}), _step(name, {}), 1e-5)


def test_eval_and_no_grad_use_the_plain_path():
    """Inference is untouched by the switches (official parity runs there)."""
    torch.manual_seed(0)
    a = s4v.create_model("s4v_tiny", 5, 4).eval()
    torch.manual_seed(0)
    b = s4v.create_model("s4v_tiny", 5, 4, **OFFICIAL_LIKE).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)


class _SideOnly(nn.Module):
    """Side network + head of a model fed with given backbone tokens (the backbone runs without
    autograd, so it does not change what backward keeps)."""

    def __init__(self, name, **overrides):
        super().__init__()
        spec = apply_overrides(get_spec(name), overrides) if overrides else get_spec(name)
        bb = spec.backbone
        n = len(spec.side.tap_layers(bb.layers))
        self.side = SideNetwork(spec.side, bb.width, bb.patch_size, bb.num_patches, n)
        self.head = RecognitionHead(spec.side.width, 174, spec.side.post_bn)
        self.spec, self.num_taps = spec, n

    def set_grad_checkpointing(self, on):
        self.side.grad_checkpointing = on

    def forward(self, video, taps):
        return self.head(self.side(video, taps), video.shape[0])


def _saved_per_clip(name, overrides, ckpt=False, half=False, batch=1, frames=8):
    torch.manual_seed(0)
    model = _SideOnly(name, **overrides).train()
    model.set_grad_checkpointing(ckpt)
    bb = model.spec.backbone
    dt = torch.bfloat16 if half else torch.float32
    video = torch.randn(batch, frames, 3, bb.image_size, bb.image_size)
    tokens = [torch.randn(batch * frames, 1 + bb.num_patches, bb.width, dtype=dt) for _ in range(model.num_taps)]
    taps = [(t[:, :1], t[:, 1:]) for t in tokens]
    tracker = SavedTensorTracker(model)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        out = model(video, taps)
    assert out.requires_grad
    return tracker.total / batch / MiB, tracker.by_category()


def test_tracker_counts_each_storage_once_and_skips_parameters():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with SavedTensorTracker(lin) as tr:
        y = lin(x)
        z = (y * y).sum()  # y saved twice by mul: counted once
    assert tr.total == x.numel() * 4 + y.numel() * 4
    z.backward()


def test_each_saving_lowers_saved_bytes_tiny():
    steps = [dict(OFFICIAL_LIKE)]
    for key, value in (("side.attention", "sdpa"), ("side.fused_taps", True), ("side.fused_norms", True),
                       ("side.mlp_recompute", "gelu"), ("side.mlp_recompute", "fc1")):
        steps.append({**steps[-1], key: value})
    sizes = [_saved_per_clip("s4v_tiny", ov, frames=4)[0] for ov in steps]
    assert all(b < a for a, b in zip(sizes, sizes[1:])), sizes
    assert _saved_per_clip("s4v_tiny", {}, ckpt=True, frames=4)[0] < sizes[-1]


def test_b16_saved_bytes_per_clip_meet_the_targets():
    """s4v_b16, 8 frames, 224 px, batch 1: default <= 0.75x and checkpointing <= 0.25x the official
    model's bytes saved for backward (580 MiB fp32, 370 MiB bf16 autocast)."""
    fp32, cats = _saved_per_clip("s4v_b16", {})
    assert fp32 <= 0.75 * OFFICIAL_B16_MIB["fp32"], (fp32, cats)
    ckpt, _ = _saved_per_clip("s4v_b16", {}, ckpt=True)
    assert ckpt <= 0.25 * OFFICIAL_B16_MIB["fp32"], ckpt
    bf16, _ = _saved_per_clip("s4v_b16", {}, half=True)
    assert bf16 <= 0.75 * OFFICIAL_B16_MIB["bf16"], bf16
