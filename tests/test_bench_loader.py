"""`s4v bench loader`: what it times (exactly the timed batches, no worker shutdown) and its reference rows."""
import time

import pytest
import torch

import _video_fixtures as vf
from s4v.bench import loader as bench

PERIOD, SHUTDOWN = 0.05, 0.6  # seconds per batch, seconds the loader takes to end after its last batch


class FakeLoader:
    """Batches of 2 clips every PERIOD s; ending (the DataLoader's worker shutdown) takes SHUTDOWN s."""

    def __init__(self, available: int):
        self.available, self.pulled, self.skipped = available, 0, 0

    def __iter__(self):
        for _ in range(self.available):
            time.sleep(PERIOD)
            self.pulled += 1
            yield {"video": torch.zeros(2, 4, 3, 8, 8)}
        time.sleep(SHUTDOWN)


@pytest.fixture
def fake(monkeypatch):
    made = []

    def build_loader(cfg, split, train, device="cpu", **kw):
        made.append(FakeLoader(made_available[0]))
        return made[-1]

    made_available = [0]
    monkeypatch.setattr("s4v.data.loader.build_loader", build_loader)

    def run(available: int, batches: int):
        made_available[0] = available
        rate, clips, skipped = bench.measure(None, "train", True, batches, "cpu")
        return rate, clips, made[-1]

    return run


def test_measure_pulls_only_the_timed_batches(fake):
    """With more batches available than timed, the bench waits for exactly 1 untimed + K timed ones
    (it used to wait for one more, under-reporting clips/s by 1/(K+1))."""
    rate, clips, loader = fake(available=12, batches=4)
    assert clips == 8
    assert loader.pulled == 1 + 4
    assert 0 < rate <= 2 / PERIOD * 1.05  # 2 clips per PERIOD at most


def test_measure_excludes_the_loader_shutdown(fake):
    """When the timed batches are the epoch's last, the loader's shutdown is not timed."""
    rate, clips, loader = fake(available=1 + 3, batches=3)
    assert clips == 6 and loader.pulled == 4
    assert 6 / rate < 3 * PERIOD + SHUTDOWN / 2, rate  # the shutdown would add SHUTDOWN s


# ----------------------------------------------------------------------------- reference rows, end to end


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    vf.simple_split(root, "train", 2, 4, frames=(12, 16))
    return root


def test_bench_prints_reference_rows(shards, capsys):
    rc = bench.main(["--shards", str(shards), "--batches", "2", "--batch-size", "2", "--num-frames", "4",
                     "--workers", "0", "--engines", "pyav", "--image-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "pyav" in rows and "pyav-plain" in rows and "torchcodec" in rows
    assert float(rows["pyav-plain"].split()[1]) > 0
    assert "s4v pyav / pyav-plain" in out
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:
        assert "torchcodec not usable" in rows["torchcodec"]


def test_reference_decodes_the_planned_frames(shards):
    """The reference rows decode the frames and crop boxes the loader's plans ask for (solid clips:
    the grey level tells the frame)."""
    from s4v.bench.loader_reference import reference_batches
    from s4v.data.config import DataConfig

    cfg = DataConfig(root=str(shards), loader="pyav", num_frames=4, image_size=16, resize_short=20,
                     batch_size=2, num_workers=0, min_shards_per_reader=0, sampling="uniform")
    for decoder in ["pyav"] + (["torchcodec"] if _torchcodec_works() else []):
        for batch in reference_batches(cfg, "train", train=False, decoder=decoder, worker=0, workers=1):
            assert batch["video"].dtype == torch.uint8 and batch["video"].shape[-3:] == (3, 16, 16)
            for clip, frames in zip(batch["video"], batch["frames"]):
                levels = clip[0].float().mean(dim=(-1, -2, -3))
                assert [vf.frame_index_of(x) for x in levels.tolist()] == frames.tolist(), decoder


def _torchcodec_works() -> bool:
    from s4v.bench.loader_reference import torchcodec_problem

    return torchcodec_problem() is None
