"""Model zoo: shapes, exact parameter counts, freezing, gradients, CLS shift, checkpointing."""
import re
from pathlib import Path

import pytest
import torch

import s4v
from s4v.model.flops import model_stats
from s4v.model.layers import shift_cls

TINY = ["s4v_tiny", "s4v_tiny_eva"]


def tiny(name, num_classes=5, num_frames=4, seed=0, **kw):
    torch.manual_seed(seed)
    return s4v.create_model(name, num_classes, num_frames, **kw)


def video(batch=2, frames=4, size=32, seed=1):
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,expected", [
    ("s4v_b16", 21_112_686), ("s4v_l14", 102_108_846), ("s4v_e14", 183_373_806)])
def test_trainable_parameter_counts_match_official(name, expected):
    model = s4v.create_model(name, num_classes=174, num_frames=8, device="meta")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in model.trainable_parameters()) == expected


def test_every_model_builds_on_meta_and_reports_flops():
    for name in s4v.list_models():
        model = s4v.create_model(name, 174, 8, device="meta")
        assert all(p.is_meta for p in model.parameters())
    stats = model_stats(s4v.create_model("s4v_b16", 174, 8, device="meta"))
    assert 170 < stats.gflops < 182  # paper: 528 GFLOPs for 3 views
    assert 135 < stats.backbone_gflops < 146 and 30 < stats.side_gflops < 40


def test_e14_structure_on_meta():
    model = s4v.create_model("s4v_e14", 174, 8, device="meta")
    assert len(model.side.blocks) == 32 and model.backbone.taps == list(range(1, 64, 2))
    assert model.head.bn is None and model.side.blocks[0].post_norm
    assert model.side.blocks[0].attn.heads == 9


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes(name):
    model = tiny(name, num_classes=7)
    model.eval()
    out = model(video())
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    taps = model.backbone(video().flatten(0, 1))
    n = model.spec.backbone.num_patches
    assert all(c.shape == (8, 1, model.spec.backbone.width) and p.shape == (8, n, model.spec.backbone.width)
               for c, p in taps)


def test_input_shape_error_is_clear():
    model = tiny("s4v_tiny")
    with pytest.raises(ValueError, match=r"expects video \[B, T, 3, 32, 32\]"):
        model(torch.randn(2, 4, 3, 64, 64))


@pytest.mark.parametrize("name", TINY)
def test_backbone_frozen_and_side_trains(name):
    model = tiny(name)
    model.train()
    assert not model.backbone.tower.training  # eval mode kept through model.train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    taps = model.backbone(video().flatten(0, 1))
    assert all(c.grad_fn is None and p.grad_fn is None for c, p in taps)  # no graph built
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(video()), torch.tensor([1, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("backbone."):
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cls_shift_semantics():
    b, t, d = 2, 4, 6
    c = torch.arange(b * t * d, dtype=torch.float32).view(b * t, 1, d) + 1
    out = shift_cls(c, t).view(b, t, d)
    src = c.view(b, t, d)
    for clip in range(b):
        for f in range(t):
            exp_fwd = src[clip, f + 1, :3] if f + 1 < t else torch.zeros(3)
            exp_bwd = src[clip, f - 1, 3:] if f > 0 else torch.zeros(3)
            assert torch.equal(out[clip, f, :3], exp_fwd)
            assert torch.equal(out[clip, f, 3:], exp_bwd)
    assert not torch.equal(out, src)  # frame t's own CLS is not kept


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_same_numbers_and_bn_updates_once(name):
    ref, ckpt = tiny(name, seed=3), tiny(name, seed=3)
    ckpt.set_grad_checkpointing(True)
    x, y = video(), torch.tensor([0, 4])
    for m in (ref, ckpt):
        m.train()
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (n, a), (_, b) in zip(ref.side.named_parameters(), ckpt.side.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), n
    for (n, a), (_, b) in zip(ref.state_dict().items(), ckpt.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n  # running stats updated exactly once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone(dtype):
    model = tiny("s4v_tiny", backbone_dtype=dtype)
    assert model.backbone.dtype == dtype
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    taps = model.backbone(video().flatten(0, 1))
    assert taps[0][1].dtype == dtype
    out = model(video())
    out.sum().backward()
    assert torch.isfinite(out).all()
    ref = tiny("s4v_tiny").eval()
    model.eval()
    assert torch.allclose(ref(video()), model(video()), atol=5e-2)


def test_overrides_and_errors():
    model = s4v.create_model("s4v_tiny", 3, 4, side_width=128, device="meta")
    assert model.side.spec.width == 128 and model.side.blocks[0].attn.heads == 2
    with pytest.raises(ValueError, match="did you mean 'side.width'"):
        s4v.create_model("s4v_tiny", 3, 4, **{"side.widht": 128})
    with pytest.raises(ValueError, match="did you mean 's4v_tiny'"):
        s4v.create_model("s4v_tiyn", 3, 4)


def test_model_code_is_framework_free():
    pkg = Path(s4v.__file__).parent / "model"
    for path in pkg.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(deepspeed|nvidia\.dali|torch\.distributed)", text, re.M), path


def test_info_command(capsys):
    from s4v.cli.main import main

    assert main(["info", "s4v_b16"]) == 0
    out = capsys.readouterr().out
    assert "trainable 21,112,686" in out and "GFLOPs/view   175.7" in out
    assert main(["info", "s4v_b61"]) == 2
    assert "did you mean 's4v_b16'" in capsys.readouterr().err
    assert main(["info", "s4v_retrieval_b32"]) == 0
    out = capsys.readouterr().out
    assert "12 frames" in out and "video encoder" in out


def test_frame_mean_variant_ignores_frame_order():
    """With no temporal kernel and no CLS shift the side network is per-frame: the demo's baseline."""
    model = tiny("s4v_tiny", **{"side.temporal_kernel": 1, "side.cls_shift": False}).eval()
    ref = tiny("s4v_tiny").eval()
    x = video()
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(model(x), model(x[:, perm]), atol=1e-5)
    assert not torch.allclose(ref(x), ref(x[:, perm]), atol=1e-3)
