"""Two CPU ranks under torchrun: a rank SIGKILLed mid-step ends the whole job quickly with a message
naming the dead rank, and resuming gives the weights of a run that was never interrupted; a
preemption signal (SIGUSR1) checkpoints at the exact data position, and the requeued run delivers every
sample of the epoch exactly once over both runs."""
import collections
import time
from pathlib import Path

import pytest

from ._common import assert_same_weights, ckpt_dir, final_weights, launch, overrides, read_keylog

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]
STEPS = 6  # 24 clips / 2 ranks / batch 2


@pytest.fixture(scope="module")
def reference(clean_shards, tmp_path_factory):
    """An uninterrupted 2-rank epoch, with every batch's keys logged per rank."""
    out = tmp_path_factory.mktemp("ref")
    run = launch(overrides(clean_shards, out, "ref"), nproc=2, faults={"S4V_FAULT_KEYLOG": str(out / "keys")})
    assert run.returncode == 0, run.tail()
    res = run.result()
    assert res["status"] == "finished" and res["step"] == STEPS
    return {"out": out, "weights": final_weights(ckpt_dir(out, "ref")), "keys": read_keylog(out / "keys")}


def _alive(pid: int) -> bool:
    try:
        state = [x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:")]
    except OSError:
        return False
    return bool(state) and "Z" not in state[0].split()[1]


def test_rank_killed_mid_step_ends_job_and_resume_matches(clean_shards, reference, tmp_path):
    logs = tmp_path / "keys"
    args = overrides(clean_shards, tmp_path, "killed", **{"train.ckpt_every_steps": 2})
    run = launch(args, nproc=2, faults={"S4V_FAULT_KEYLOG": str(logs), "S4V_FAULT_KILL": "1:4"})
    killed_at = float((logs / "killed_at").read_text())
    # the job ends, promptly, with an error that names the dead rank and the signal
    assert run.returncode != 0
    assert run.ended - killed_at < 60, f"job took {run.ended - killed_at:.0f} s to end after the kill"
    root_cause = run.stderr.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause and "SIGKILL" in root_cause, run.tail()
    for rank in (0, 1):  # no rank outlives the job
        pid = int((logs / f"pid_rank{rank}").read_text())
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), f"rank {rank} (pid {pid}) still running"
    ckpts = ckpt_dir(tmp_path, "killed")
    assert (ckpts / "latest").read_text().strip() == "step_00000002"  # step 4 was never reached

    rest = launch(args, nproc=2)  # the same command again: train.resume=auto
    assert rest.returncode == 0, rest.tail()
    assert "resumed from" in rest.output and "step 2" in rest.output
    res = rest.result()
    assert res["status"] == "finished" and res["step"] == STEPS
    assert_same_weights(final_weights(ckpts), reference["weights"])


def test_preemption_resumes_at_exact_data_position(clean_shards, reference, tmp_path):
    logs = tmp_path / "keys"
    args = overrides(clean_shards, tmp_path, "preempted")
    # SIGUSR1 reaches rank 0 only, during step 3: both ranks agree, checkpoint after step 3 and stop
    first = launch(args, nproc=2, faults={"S4V_FAULT_KEYLOG": str(logs), "S4V_FAULT_USR1": "0:3"})
    assert first.returncode == 0, first.tail()
    res = first.result()
    assert res["status"] == "preempted" and res["step"] == 3, res
    ckpts = ckpt_dir(tmp_path, "preempted")
    assert (ckpts / "latest").read_text().strip() == "step_00000003"

    second = launch(args, nproc=2, faults={"S4V_FAULT_KEYLOG": str(logs)})
    assert second.returncode == 0, second.tail()
    res = second.result()
    assert res["status"] == "finished" and res["step"] == STEPS

    got, ref = read_keylog(logs), reference["keys"]
    assert sorted(got) == sorted(ref) == [0, 1]
    for rank in (0, 1):  # the same batches at the same steps as the uninterrupted run
        assert [(r["epoch"], r["step"], r["keys"]) for r in got[rank]] == \
               [(r["epoch"], r["step"], r["keys"]) for r in ref[rank]], rank
    counts = collections.Counter(k for rank in got for r in got[rank] for k in r["keys"])
    assert len(counts) == 24 and set(counts.values()) == {1}  # every sample once: none twice, none skipped
    assert_same_weights(final_weights(ckpts), reference["weights"])
