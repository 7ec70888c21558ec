"""Shared fixtures: the real SmolLM2-135M model and short-lived vLLM engines on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vllm_lowrank.engine import kv_cache_tokens, vllm_llm  # noqa: F401  (re-exported to the tests)

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from vllm_lowrank.models import smollm2

    return smollm2()


def vllm_engine(model: Path, **kwargs):
    """An offline ``LLM`` (float32, eager, seeded, block size 16) that is shut down on exit.

    Keyword arguments go to ``LLM``; without ``attention_backend`` it is vLLM's own backend.
    """
    args = dict(dtype="float32", max_model_len=768, kv_cache_memory_bytes=64 << 20, disable_log_stats=False)
    args.update(kwargs)
    return vllm_llm(model, backend=None, **args)


REAL_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
             "Locally nicknamed 'La dame de fer', it was constructed as the centrepiece of the 1889 World's Fair, "
             "and to crown the centennial anniversary of the French Revolution. Although initially criticised by "
             "some of France's leading artists and intellectuals for its design, it has since become a global "
             "cultural icon of France and one of the most recognisable structures in the world.")


@pytest.fixture(scope="session")
def real_qkv(smollm2) -> dict[int, tuple]:
    """Post-RoPE q [T, 9, 64], k and v [T, 3, 64] (float32) of SmolLM2 layers 0, 7, 15 and 29 on real text."""
    import torch
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    captured: list[tuple] = []
    original = llama.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        captured.append((q[0].transpose(0, 1).detach(), k[0].transpose(0, 1).detach()))
        return q, k

    values: list = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o[0].detach()))
             for layer in model.model.layers]
    llama.apply_rotary_pos_emb = capture
    try:
        with torch.no_grad():
            model(**tok(REAL_TEXT, return_tensors="pt"))
    finally:
        llama.apply_rotary_pos_emb = original
        for h in hooks:
            h.remove()
    return {i: (captured[i][0], captured[i][1], values[i].view(values[i].shape[0], 3, 64)) for i in (0, 7, 15, 29)}


def attention64(q, k, v, q_pos, scale):
    """Float64 causal attention: q [Q, Hq, D] at positions q_pos over k/v [L, H, D] (the tests' ground truth)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,lhd->hql", q.double(), k) * scale
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), v)
