"""The backend's Triton path inside vLLM, on the CPU: kernels run in Triton's interpreter.

On a GPU the backend stores with the Triton store kernel, decodes with the split-KV kernel and runs
continuation chunks and prefix-cache hits through the paged prefill kernel (a layered cache's too). Here the same plumbing
(metadata, strides, dtypes, request runs) is driven by vLLM's CPU build with
``VLLM_LOWRANK_KERNELS=triton`` and ``TRITON_INTERPRET=1``, on a tiny two-layer Llama with dummy
weights (the interpreter is slow), and must give the same greedy tokens as the PyTorch path. The
float32 kernels differ from the oracle only by summation order, so a divergence is allowed only at a
near-tie (top-2 log-probability gap under 1e-3), as in test_vllm_e2e.py.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import vllm_engine
from test_vllm_e2e import NEAR_TIE

pytestmark = pytest.mark.vllm

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
ENGINE = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=512, max_num_batched_tokens=64,
              max_num_seqs=8, kv_cache_memory_bytes=8 << 20)


def _prompts():
    from vllm.inputs import TokensPrompt

    shared = [(7 * i) % 500 + 3 for i in range(40)]  # 40-token shared prefix: two full 16-token blocks hit
    return [TokensPrompt(prompt_token_ids=p) for p in (
        [5, 9, 13],
        [(3 * i) % 500 + 1 for i in range(21)],
        [(11 * i) % 500 + 2 for i in range(150)],  # longer than max_num_batched_tokens: prefilled in chunks
        shared + [401, 402],
    )], TokensPrompt(prompt_token_ids=shared + [403, 404, 405])


def _run(model, settings: dict, kernels: str, capfd) -> list:
    """Greedy tokens of the batch, then of a prompt that hits the batch's cached prefix (not with a layered
    cache, which needs prefix caching off)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, detokenize=False, ignore_eos=True)
    batch, hit = _prompts()
    layered = bool(settings.get("exact_window") or settings.get("exact_sink"))
    old = {k: os.environ.get(k) for k in ("VLLM_LOWRANK_KERNELS", "TRITON_INTERPRET", "VLLM_LOGGING_LEVEL")}
    os.environ.update(VLLM_LOWRANK_KERNELS=kernels, TRITON_INTERPRET="1", VLLM_LOGGING_LEVEL="INFO")
    try:
        with vllm_engine(model, attention_backend="lowrank", additional_config={"lowrank": settings},
                         enable_prefix_caching=not layered, **ENGINE) as llm:
            outs = llm.generate(batch, params, use_tqdm=False)
            second = llm.generate([hit], params, use_tqdm=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not layered:
        assert second[0].num_cached_tokens >= 32, "the shared prefix was not served from the cache"
    path = "the Triton kernels" if kernels == "triton" else "the PyTorch path"
    assert f"lowrank attention on cpu runs {path}" in capfd.readouterr().out  # the engine's own log
    return outs + second


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY))
    return d


@pytest.mark.parametrize("settings", [
    {"format": {"k": "hadamard+int4", "v": "int8"}},
    # a layered cache: decodes write the ring (kernel) and read it in the decode kernel; the 150-token
    # prompt's continuation chunks read it in the prefill kernel and are written into it afterwards
    {"format": {"k": "hadamard+int4", "v": "int8"}, "exact_window": 8, "exact_sink": 1},
    {"format": {"k": "hadamard+int4", "v": "int8"}, "exact_window": 8, "exact_sink": 1, "exact_dtype": "int8"},
], ids=["int4-k-int8-v", "layered-w8-s1", "layered-w8-s1-int8-ring"])
def test_triton_path_matches_torch_path(tiny_model, settings, capfd):
    torch_outs = _run(tiny_model, settings, "torch", capfd)
    triton_outs = _run(tiny_model, settings, "triton", capfd)
    for ref, out in zip(torch_outs, triton_outs, strict=True):
        a, b = list(ref.outputs[0].token_ids), list(out.outputs[0].token_ids)
        assert len(a) == len(b) == 8
        if a == b:
            continue
        i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        top = sorted(ref.outputs[0].logprobs[i].values(), key=lambda lp: -lp.logprob)[:2]
        assert top[0].logprob - top[1].logprob < NEAR_TIE, f"diverges at token {i}: {a} vs {b}"
