"""`train.compile`: the compiled side network (and frozen tower) gives eager's logits, gradients and
BatchNorm statistics (CPU inductor), compiles without a graph break (no host sync in the step), and
keeps parameter names (checkpoints, DeepSpeed)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import s4v
from s4v.experiment import load_experiment
from s4v.train.compile import compile_model


def _step(model, video, label, precision):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(video)
    F.cross_entropy(logits.float(), label).backward()
    return logits.detach().float()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which,precision,tol,ckpt", [("side+tower", "fp32", 1e-4, False), ("side", "bf16", 3e-2, False),
                                                     ("side", "fp32", 1e-4, True)])
def test_compiled_step_equals_eager(which, precision, tol, ckpt):
    """ckpt: with activation checkpointing (the memory-saving mode), BatchNorm statistics still move once."""
    torch.manual_seed(0)
    eager = s4v.create_model("s4v_tiny", num_classes=5, num_frames=4,
                             backbone_dtype="bf16" if precision == "bf16" else "fp32")
    eager.set_grad_checkpointing(ckpt)
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    compile_model(compiled, which, fullgraph=True)  # fullgraph: a host sync or graph break would fail here
    assert [n for n, _ in compiled.named_parameters()] == names and compiled.state_dict().keys() == eager.state_dict().keys()
    eager.train(), compiled.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step sees the first one's BatchNorm statistics
        video = torch.randn(2, 4, 3, 32, 32, generator=gen)
        label = torch.randint(0, 5, (2,), generator=gen)
        a, b = _step(eager, video, label, precision), _step(compiled, video, label, precision)
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol, msg=name)
        for (name, x), y in zip(eager.named_buffers(), compiled.buffers()):
            torch.testing.assert_close(y, x, rtol=tol, atol=tol, msg=name)
        eager.zero_grad(), compiled.zero_grad()


def test_compile_setting_and_half_video_resolved(tmp_path):
    cfg = load_experiment(None, ["train.compile=side", "model.backbone_dtype=bf16"])
    assert cfg.train.compile == "side" and cfg.data.output_dtype == "float16"
    assert load_experiment(None, ["model.backbone_dtype=fp32"]).data.output_dtype == "float32"
    assert load_experiment(None, ["data.loader=pyav"]).data.output_dtype == "float32"
    assert load_experiment(None, ["data.output_dtype=float32"]).data.output_dtype == "float32"
    with pytest.raises(Exception, match="train.compile"):
        load_experiment(None, ["train.compile=everything"])
    model = s4v.create_model("s4v_tiny", num_classes=5, num_frames=4, device="meta")
    assert compile_model(model, "none") is model
    with pytest.raises(ValueError, match="train.compile"):
        compile_model(model, "tower")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_training_through_deepspeed_gives_the_eager_losses(tmp_path):
    """`train.compile=side` through the real `s4v train` (DeepSpeed ZeRO-2, fp32, one epoch of the tiny
    setting): every step's loss equals the eager run's (measured: 1e-6 apart)."""
    from tests._train_fixtures import losses, run_train, tiny_overrides, write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards")
    common = {"train.epochs": 1, "eval.every_epochs": 0}
    eager = run_train(tiny_overrides(shards, tmp_path, "eager", **common))
    compiled = run_train(tiny_overrides(shards, tmp_path, "compiled", **common, **{"train.compile": "side"}))
    a, b = losses(eager["run_dir"]), losses(compiled["run_dir"])
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
