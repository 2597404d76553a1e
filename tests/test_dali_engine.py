"""The pipelined DALI engine (DALI's CPU backend over VP9): several asynchronous pipelines, read-ahead
threads and float16 output deliver exactly what the synchronous engine does, in plan order, with the
same skips of corrupt clips and the same resume positions."""
import dataclasses

import pytest
import torch

import _video_fixtures as vf
from s4v.config import ConfigError
from s4v.data.config import DataConfig
from s4v.data.loader import build_loader

pytestmark = pytest.mark.timeout(120)

SYNC = dict(dali_pipelines=1, dali_prefetch=1, dali_read_threads=0)  # the engine before issue 17
FAST = dict(dali_pipelines=3, dali_prefetch=3, dali_read_threads=2)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("dali_engine")
    out = {"good": base / "good", "bad": base / "bad"}
    vf.simple_split(out["good"], "train", 3, 5, codec="vp9")
    S = vf.Spec
    bad = [[S("a0", 12, 1, codec="vp9"), S("a1", 8, 2, codec="vp9", corrupt="garbage"), S("a2", 8, 3, codec="vp9")],
           [S("b0", 12, 4, codec="vp9", corrupt="truncate"), S("b1", 8, 5, codec="vp9"), S("b2", 8, 0, codec="vp9")],
           [S("c0", 8, 1, codec="vp9"), S("c1", 12, 2, codec="vp9"), S("c2", 8, 3, codec="vp9", corrupt="garbage")],
           [S("d0", 8, 4, codec="vp9"), S("d1", 8, 5, codec="vp9"), S("d2", 12, 0, codec="vp9")]]
    vf.write_split(out["bad"], "train", bad)
    return out


def cfg_for(root, **kw) -> DataConfig:
    base = dict(root=str(root), loader="dali", device="cpu", num_frames=4, image_size=32, resize_short=36,
                batch_size=2, num_workers=1, min_shards_per_reader=0, grayscale_prob=0.5)
    base.update(kw)
    return DataConfig(**base)


def run(cfg: DataConfig, train: bool, epoch: int = 1):
    loader = build_loader(cfg, "train", train=train, epoch=epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    return loader, batches


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["label"], y["label"]) and torch.equal(x["valid"], y["valid"])
        assert x["video"].dtype == y["video"].dtype and torch.equal(x["video"], y["video"])


@pytest.mark.parametrize("train", [True, False])
def test_pipelined_engine_delivers_what_the_synchronous_one_does(splits, train):
    """3 async pipelines 3 batches ahead + 2 read threads: bit-identical batches in plan order."""
    kw = dict(repeated_aug=2, test_clips=2, test_crops=3, rand_augment="rand-m7-n2-mstd0.5-inc1" if train else None)
    _, ref = run(cfg_for(splits["good"], **SYNC, **kw), train)
    _, fast = run(cfg_for(splits["good"], **FAST, **kw), train)
    same_batches(ref, fast)
    shape = (4, 3, 32, 32) if train else (6, 4, 3, 32, 32)
    assert fast[0]["video"].shape[1:] == shape


@pytest.mark.parametrize("train", [True, False])
def test_corrupt_clips_skipped_the_same_with_several_async_pipelines(splits, train):
    """A corrupt clip kills the pipeline that met it: it is replaced, the batches it owed are rescued,
    the good samples arrive in plan order and the same broken ones are skipped as on one sync pipeline."""
    ref_loader, ref = run(cfg_for(splits["bad"], **SYNC), train)
    loader, fast = run(cfg_for(splits["bad"], **FAST), train)
    same_batches(ref, fast)
    broken = {"a1", "b0", "c2"}
    assert {k for k, _ in loader.skipped_keys} == {k for k, _ in ref_loader.skipped_keys}
    assert {k for k, _ in loader.skipped_keys} <= broken
    if not train:
        assert {k for k, _ in loader.skipped_keys} == broken
    assert loader.engine.rebuilds >= 1


def test_resume_mid_epoch_with_several_pipelines(splits):
    cfg = cfg_for(splits["good"], **FAST, repeated_aug=2)
    _, ref = run(cfg, True, epoch=3)
    first = build_loader(cfg, "train", train=True, epoch=3)
    head = []
    for b in first:  # stop while the pipelines still hold batches in flight
        head.append(b)
        if len(head) == 3:
            break
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (3, 3)
    resumed = build_loader(cfg, "train", train=True, epoch=0)
    resumed.load_state_dict(state)
    tail = list(resumed)
    same_batches(ref, head + tail)


def test_float16_output(splits):
    """float16 (for a half-precision tower) is float32's output rounded, no more."""
    _, f32 = run(cfg_for(splits["good"], output_dtype="float32"), False)
    _, f16 = run(cfg_for(splits["good"], output_dtype="float16"), False)
    for a, b in zip(f32, f16):
        assert a["video"].dtype == torch.float32 and b["video"].dtype == torch.float16
        assert (a["video"] - b["video"].float()).abs().max() < 4e-3
    _, auto = run(cfg_for(splits["good"]), False)  # auto outside an experiment: float32
    assert auto[0]["video"].dtype == torch.float32


def test_decoded_batch_is_not_copied_again(splits):
    """The train video of a fully decoded batch is a view of the one tensor DALI's output was copied
    into (no stack/unstack); a batch with failures matches batch.assemble's contract."""
    from s4v.data.batch import assemble, prepare_batch
    from s4v.data.dali_pipeline import assemble_dense
    from s4v.data.reader import ShardReader

    cfg = cfg_for(splits["good"], repeated_aug=2, batch_size=3)
    loader = build_loader(cfg, "train", train=True)
    reader = ShardReader(cfg.root, loader.table)
    hb = prepare_batch(cfg, reader, 0, loader.epoch_plan()[0], True, 0)
    reader.close()
    dense = torch.randn(3, 2, 4, 3, 32, 32)
    out = assemble_dense(cfg, True, hb.slots, [0, 1, 2], dense, dense.dtype, dense.device)
    assert out["video"].data_ptr() == dense.data_ptr() and out["video"].shape == (6, 4, 3, 32, 32)
    # sample 1 failed: its slot is a copy of sample 0, like batch.assemble
    got = assemble_dense(cfg, True, hb.slots, [0, 2], dense[[0, 2]], dense.dtype, dense.device)
    want = assemble(cfg, True, hb.slots, [dense[0], None, dense[2]])
    assert torch.equal(got["video"], want["video"]) and got["key"] == want["key"]
    assert torch.equal(got["label"], want["label"]) and torch.equal(got["valid"], want["valid"])


def test_read_error_is_raised_not_taken_for_a_corrupt_clip(splits, monkeypatch):
    """An error while reading ahead (not a DALI decode failure) reaches the training loop as itself."""
    import s4v.data.dali_pipeline as dp

    real = dp.prepare_batch

    def failing(cfg, reader, index, *args):
        if index == 2:
            raise OSError("disk went away")
        return real(cfg, reader, index, *args)

    monkeypatch.setattr(dp, "prepare_batch", failing)
    for kw in (SYNC, FAST):
        loader = build_loader(cfg_for(splits["good"], **kw), "train", train=True)
        got = []
        with pytest.raises(OSError, match="disk went away"):
            for b in loader:
                got.append(b)
        assert len(got) == 2 and loader.batches_done == 2


@pytest.mark.parametrize("field,value", [("dali_pipelines", 0), ("dali_prefetch", 0), ("dali_read_threads", -1)])
def test_bad_engine_settings(splits, field, value):
    with pytest.raises(ConfigError, match=field):
        build_loader(dataclasses.replace(cfg_for(splits["good"]), **{field: value}), "train", True)


def test_forked_child_does_not_hang_on_an_inherited_pipeline(splits):
    """A PyAV DataLoader worker is forked from a process that may hold DALI pipelines; if the child's
    garbage collector destroys one (a reference cycle), DALI waits for threads the child does not
    have. The child must exit."""
    import gc
    import multiprocessing as mp

    loader = build_loader(cfg_for(splits["bad"], **FAST), "train", train=False)
    list(loader)  # builds pipelines, and the rescue pipeline (corrupt clips)
    pipe = loader.engine.rescue_pipe
    assert pipe is not None
    cycle = [pipe]
    cycle.append(cycle)
    del pipe, loader

    def child(_):
        del cycle[:]  # the cycle is gone: the pipeline's last reference dies in the child
        gc.collect()

    proc = mp.get_context("fork").Process(target=child, args=(0,))
    proc.start()
    proc.join(timeout=30)
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == 0
