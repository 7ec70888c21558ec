"""``vllm serve MODEL --attention-backend lowrank`` answers OpenAI completions and chat requests, plain
and streamed, on the CPU (through :mod:`vllm_lowrank.serve_check`, the same check as on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_lowrank.serve_check import check_server, vllm_server

pytestmark = pytest.mark.vllm


def test_vllm_serve_completions_and_chat(smollm2: Path, tmp_path: Path):
    log = tmp_path / "serve.log"
    extra = ["--max-model-len", "512", "--enforce-eager", "--kv-cache-memory-bytes", str(32 << 20)]
    with vllm_server(smollm2, {"format": "int4"}, log, served_name="smollm2", extra=extra,
                     start_timeout_s=300) as base:
        replies, failures = check_server(base, "smollm2", max_tokens=12)
    assert not failures, failures
    assert [(r.endpoint, r.stream, r.cache) for r in replies] == [
        ("completions", False, "cold"), ("completions", True, "cold"), ("chat/completions", False, "cold"),
        ("chat/completions", True, "cold"), ("completions", False, "warm")]
    assert "lowrank KV cache formats: all 30 layers K=hadamard+int4" in log.read_text()
