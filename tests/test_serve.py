"""``vllm serve MODEL --attention-backend lowrank`` answers an OpenAI completions request on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_completions(smollm2: Path, tmp_path: Path):
    vllm_cli = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    assert vllm_cli, "the vllm command is not installed"
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = [vllm_cli, "serve", str(smollm2), "--attention-backend", "lowrank",
           "--additional-config", json.dumps({"lowrank": {"format": "int4"}}),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--enforce-eager",
           "--kv-cache-memory-bytes", str(32 << 20), "--served-model-name", "smollm2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"vllm serve exited early:\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
            try:
                if _get(f"http://127.0.0.1:{port}/health") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not become healthy in time"
            time.sleep(2)
        reply = _post(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0})
        text = reply["choices"][0]["text"]
        assert reply["usage"]["completion_tokens"] == 16 and text.strip(), reply
        served_log = (tmp_path / "serve.log").read_text()
        assert "lowrank KV cache formats: all 30 layers K=hadamard+int4" in served_log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
