"""Benchmark processes started side by side and measured one at a time.

A ``vllm bench`` run spends most of its time starting up (about two minutes a variant on the H200:
compilation, CUDA graph capture) and a fraction measuring. :func:`run_side_by_side` starts a batch of
worker processes at once; each builds its engine and waits at a gate (``patches/bench_gate.py``). Once
every worker of the batch is waiting (or gone), it opens the gates one at a time, each only after the
previous worker has exited, so that the measured part of every run has the GPU to itself, as it would
in separate commands.

Worker: ``python -P -m vllm_lowrank.side_by_side GATE_DIR ARGS...`` runs vLLM's command line with
``ARGS`` (e.g. ``bench throughput ...``), its first ``LLM`` gated by ``GATE_DIR``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_lowrank.patches.bench_gate import GO, READY


@dataclass
class Job:
    """One process to run: ``cmd`` must wait at ``gate`` (create ``gate/ready``, then wait for
    ``gate/go``) before the part to be measured; its output goes to ``log``."""

    name: str
    cmd: list[str]
    gate: Path
    log: Path
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    rc: int | None = None
    startup_s: float | None = None  # launch to ready
    run_s: float | None = None  # gate opened to exit
    error: str | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _t0: float = field(default=0.0, repr=False)


def worker_command(gate: Path, vllm_args: Sequence[str]) -> list[str]:
    """The command line of a gated vLLM CLI run (see the module docstring)."""
    return [sys.executable, "-P", "-m", "vllm_lowrank.side_by_side", str(gate), *vllm_args]


def _kill(job: Job) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job._proc.pid, signal.SIGKILL)
    job._proc.wait()


def _start(job: Job) -> None:
    shutil.rmtree(job.gate, ignore_errors=True)
    job.gate.mkdir(parents=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with job.log.open("w") as log:
        log.write(" ".join(job.cmd) + "\n\n")
        log.flush()
        job._proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=job.cwd,
                                     env={**os.environ, **job.env}, start_new_session=True)
    job._t0 = time.perf_counter()


def run_side_by_side(jobs: Sequence[Job], parallel: int, on_done: Callable[[Job], None] = lambda job: None,
                     startup_timeout_s: float = 900.0, run_timeout_s: float = 900.0, poll_s: float = 0.1) -> None:
    """Run ``jobs`` in batches of ``parallel``: a batch starts together, then its jobs run alone, in
    order. ``on_done`` is called after each job (also after a failed one: ``job.rc``, ``job.error``)."""
    assert parallel >= 1
    for i in range(0, len(jobs), parallel):
        batch = jobs[i:i + parallel]
        for job in batch:
            _start(job)
        waiting = list(batch)
        deadline = time.perf_counter() + startup_timeout_s
        while waiting:
            for job in list(waiting):
                if (job.gate / READY).exists():
                    job.startup_s = time.perf_counter() - job._t0
                    waiting.remove(job)
                elif job._proc.poll() is not None:
                    job.rc, job.error = job._proc.returncode, "exited before reaching its gate"
                    waiting.remove(job)
            if waiting and time.perf_counter() > deadline:
                for job in waiting:
                    _kill(job)
                    job.rc, job.error = job._proc.returncode, f"not ready after {startup_timeout_s:.0f} s"
                waiting = []
            if waiting:
                time.sleep(poll_s)
        for job in batch:
            if job.error is None:
                (job.gate / GO).touch()
                t0 = time.perf_counter()
                try:
                    job.rc = job._proc.wait(timeout=run_timeout_s)
                except subprocess.TimeoutExpired:
                    _kill(job)
                    job.rc, job.error = job._proc.returncode, f"still running after {run_timeout_s:.0f} s"
                job.run_s = time.perf_counter() - t0
                if job.rc and job.error is None:
                    job.error = f"exit status {job.rc}"
            on_done(job)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        sys.exit(__doc__)
    from vllm_lowrank.patches import bench_gate

    bench_gate.apply(Path(argv[0]))
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
