"""Side-by-side benchmark runs: every engine of a batch is started and waiting before any is measured,
and measured parts never overlap (stub workers that use the real gate)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from vllm_lowrank.side_by_side import Job, run_side_by_side

# a stub worker: start-up of random length, the real gate, then a measured part; it records when each
# phase happened, and fails where asked (before its gate, or after it)
STUB = """
import json, sys, time
from pathlib import Path
from vllm_lowrank.patches.bench_gate import wait_at_gate
gate, startup, fail = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
t = {"start": time.time()}
time.sleep(startup)
if fail == "before":
    sys.exit(3)
t["ready"] = time.time()
wait_at_gate(gate, poll_s=0.01)
t["go"] = time.time()
time.sleep(0.15)
t["end"] = time.time()
(gate.parent / (gate.name + ".times.json")).write_text(json.dumps(t))
sys.exit(5 if fail == "after" else 0)
"""


def _jobs(tmp_path: Path, n: int, fail: dict[int, str]) -> list[Job]:
    root = Path(__file__).resolve().parent.parent
    jobs = []
    for i in range(n):
        gate = tmp_path / "gates" / f"j{i}"
        cmd = [sys.executable, "-c", STUB, str(gate), f"{random.uniform(0.05, 0.6):.3f}", fail.get(i, "no")]
        jobs.append(Job(f"j{i}", cmd, gate, tmp_path / "logs" / f"j{i}.log", cwd=root,
                        env={"PYTHONPATH": str(root)}))
    return jobs


def _times(job: Job) -> dict | None:
    p = job.gate.parent / f"{job.gate.name}.times.json"
    return json.loads(p.read_text()) if p.exists() else None


@pytest.mark.parametrize("parallel", [1, 3, 5])
def test_batches_start_together_and_measure_alone(tmp_path, parallel):
    n = 5
    fail = {1: "before", 3: "after"}
    jobs = _jobs(tmp_path, n, fail)
    done = []
    run_side_by_side(jobs, parallel, done.append, startup_timeout_s=60, run_timeout_s=60, poll_s=0.01)

    assert [j.name for j in done] == [j.name for j in jobs]  # every job reported, in order
    assert jobs[1].rc == 3 and "before reaching its gate" in jobs[1].error and _times(jobs[1]) is None
    assert jobs[3].rc == 5 and jobs[3].error == "exit status 5"
    for i in (0, 2, 4):
        assert jobs[i].rc == 0 and jobs[i].error is None and jobs[i].startup_s > 0 and jobs[i].run_s > 0.1

    measured = [(i, _times(j)) for i, j in enumerate(jobs) if _times(j)]
    assert len(measured) == 4
    # measured parts run one at a time, in order
    for (_, a), (_, b) in zip(measured, measured[1:]):
        assert a["end"] <= b["go"]
    # a job is let go only once every job of its batch has started up (reached its gate, or failed)
    for i, t in measured:
        first = i // parallel * parallel
        for j in jobs[first:first + parallel]:
            if _times(j):
                assert _times(j)["ready"] <= t["go"]


def test_startup_timeout_kills_and_reports(tmp_path):
    gate = tmp_path / "gates" / "slow"
    job = Job("slow", [sys.executable, "-c", "import time; time.sleep(60)"], gate, tmp_path / "slow.log")
    done = []
    run_side_by_side([job], 2, done.append, startup_timeout_s=0.5, poll_s=0.01)
    assert done == [job] and "not ready after" in job.error and job.rc is not None and job.run_s is None
