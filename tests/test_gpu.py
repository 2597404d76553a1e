"""GPU-only checks (skipped without CUDA): the model in half precision on CUDA, and a DeepSpeed
training step with a bf16 engine next to a bf16 frozen tower."""
import pytest
import torch

import s4v

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_forward_backward_half_backbone(dtype):
    torch.manual_seed(0)
    model = s4v.create_model("s4v_tiny", 5, 4, device="cuda", backbone_dtype=dtype)
    ref = s4v.create_model("s4v_tiny", 5, 4, device="cuda")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 4, 3, 32, 32, device="cuda")
    model.train()
    out = model(x)
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=5e-2)


def test_cuda_b16_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = s4v.create_model("s4v_b16", 174, 8, device="cuda").eval()
    x = torch.randn(2, 8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x)
        model.backbone.to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2


def test_cuda_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    a = s4v.create_model("s4v_tiny", 5, 4, device="cuda")
    b = s4v.create_model("s4v_tiny", 5, 4, device="cuda")
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(4, 4, 3, 32, 32, device="cuda")
    for m in (a, b):
        m.train()
        m(x).sum().backward()
    for (n, p), (_, q) in zip(a.side.named_parameters(), b.side.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


def test_cuda_peak_trace_accounts_for_the_peak():
    """The allocator trace of a step explains its peak: what was allocated before the step plus the
    trace's peak growth is the step's max_memory_allocated (to the allocator's rounding); and the
    operator recorder finds the call where the step reaches that peak."""
    from s4v.bench.memory import build, measure

    model = build("s4v_tiny", 4, "bf16", "cuda", {})
    video = torch.randn(8, 4, 3, 32, 32, device="cuda")
    row = measure(model, video, "bf16", step=True, trace_peak=True)
    assert row.peak_sites is not None and row.peak_sites["groups"]
    total = row.peak_base + row.peak_sites["peak_growth"]
    assert abs(total - row.cuda_peak) <= 0.05 * row.cuda_peak, (total, row.cuda_peak)
    # the operator recorder, read from the same step, names a call whose high is that peak
    high = row.peak_op["peak"]["high"]
    assert abs(high - row.cuda_peak) <= 0.05 * row.cuda_peak, (row.peak_op["peak"], row.cuda_peak)


def test_cuda_predict_and_extract_agree_with_the_cpu(tmp_path):
    """`s4v predict` / `s4v extract` with --device cuda (bf16 autocast, as s4v eval): the same top-1 and
    scores within bf16 tolerance as on the CPU, the features too."""
    import io
    import json

    from s4v.infer.features import video_features
    from s4v.infer.predict import predict_files
    from tests._media_files import write_video

    files = [str(write_video(tmp_path / f"v{i}.mp4", frames=12 + i, height=32, width=40)) for i in range(4)]
    torch.manual_seed(0)
    model, pre = s4v.create_model("s4v_tiny", 5, 4, return_preprocess=True)
    lines = {}
    for device in ("cpu", "cuda"):
        out = io.StringIO()
        counts = predict_files(model.to(device).eval(), pre, files, out, topk=5, workers=0,
                               device=torch.device(device), progress=False)
        assert counts["num_predicted"] == len(files)
        lines[device] = [json.loads(x) for x in out.getvalue().splitlines()]
    for cpu, gpu in zip(lines["cpu"], lines["cuda"]):
        assert dict(gpu["top"])[cpu["top"][0][0]] == pytest.approx(cpu["top"][0][1], abs=2e-2)
    video = pre(files[0])
    with torch.no_grad():
        ref = video_features(model.cpu(), video, pre.views, "clip")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = video_features(model.cuda(), video.cuda(), pre.views, "clip")
    assert torch.allclose(got.float().cpu(), ref, atol=5e-2, rtol=5e-2)
