"""The lowrank backend inside real vLLM (CPU build) on SmolLM2-135M.

Greedy output, chunked prefill, prefix caching and preemption are compared with vLLM's own CPU
backend in float32. A divergence is tolerated only at a near-tie: where the two token streams first
differ, the uncompressed run's top-2 log-probability gap must be under 1e-3 (float32 summation
order differs between backends, so an exact tie can break either way).
"""

from __future__ import annotations

import pytest

from conftest import kv_cache_tokens, vllm_engine

pytestmark = pytest.mark.vllm

NEAR_TIE = 1e-3
NEW_TOKENS = 64
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "Water boils at a temperature of",
    "A haiku about the sea:",
    "The main difference between a virus and a bacterium is",
    "To make a cup of tea, first",
    "The largest planet in our solar system",
    "Machine learning is",
    "My favourite book is",
    "The stock market crashed because",
    "Here is a list of prime numbers: 2, 3, 5,",
]
# a prompt longer than max_num_batched_tokens (prefilled in chunks), and a shared prefix
LONG_PROMPT = " ".join(
    f"Paragraph {i}: the river runs past the mill, the miller counts {i * 7} sacks of grain, and the "
    f"children of the village watch the water wheel turn until the evening bell rings." for i in range(16))
SHARED_PREFIX = " ".join(f"Rule {i}: every traveller must carry {i + 2} coins and a lantern." for i in range(24))

# small cache (about 800 float32 tokens, < 16 x (prompt + 64)) so that the batch is preempted
ENGINE = dict(kv_cache_memory_bytes=800 * 30 * 3 * 64 * 2 * 4, max_num_batched_tokens=256, max_num_seqs=16)


def _greedy(max_tokens: int = NEW_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)


def _run_scenarios(llm) -> dict:
    """The three scenarios on one engine: a preempting batch, a chunked long prompt, a prefix hit."""
    batch = llm.generate(PROMPTS, _greedy())
    preemptions = _counter(llm, "vllm:num_preemptions")
    long = llm.generate([LONG_PROMPT], _greedy(32))
    first = llm.generate([SHARED_PREFIX + " The first rule says"], _greedy(32))
    second = llm.generate([SHARED_PREFIX + " The last rule says"], _greedy(32))
    return {"batch": batch, "preemptions": preemptions, "long": long, "prefix": first + second,
            "cached_tokens": second[0].num_cached_tokens, "long_prompt_tokens": len(long[0].prompt_token_ids)}


def _counter(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def _assert_same_greedy(ref_outputs, outputs, what: str) -> None:
    for ref, out in zip(ref_outputs, outputs, strict=True):
        a, b = list(ref.outputs[0].token_ids), list(out.outputs[0].token_ids)
        if a == b:
            continue
        i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        top = sorted(ref.outputs[0].logprobs[i].values(), key=lambda lp: -lp.logprob)[:2]
        gap = top[0].logprob - top[1].logprob
        assert gap < NEAR_TIE, (
            f"{what}: prompt {ref.prompt[:40]!r} diverges at token {i} ({a[i]} vs {b[i]}) where the "
            f"uncompressed top-2 gap is {gap:.2e} (not a near-tie)")


@pytest.fixture(scope="module")
def baseline(smollm2):
    with vllm_engine(smollm2, **ENGINE) as llm:
        backend = type(llm.llm_engine.vllm_config).__name__  # noqa: F841  (engine built)
        result = _run_scenarios(llm)
        result["tokens"] = kv_cache_tokens(llm)
    return result


@pytest.fixture(scope="module")
def orthonormal_basis(smollm2, tmp_path_factory):
    from vllm_lowrank.basis import orthonormal_basis_file

    path = tmp_path_factory.mktemp("basis") / "orthonormal.safetensors"
    orthonormal_basis_file(30, 3, 64, seed=1234).save(path)
    return path


@pytest.mark.parametrize("settings", [
    pytest.param({"format": "full"}, id="full"),
    pytest.param({"format": "lowrank", "rank_k": 64, "rank_v": 64}, id="lowrank-r64"),
])
def test_same_tokens_as_vllm(smollm2, baseline, orthonormal_basis, settings):
    if settings["format"] == "lowrank":
        settings = {**settings, "basis": str(orthonormal_basis)}
    with vllm_engine(smollm2, attention_backend="lowrank", additional_config={"lowrank": settings},
                     **ENGINE) as llm:
        ours = _run_scenarios(llm)
        tokens = kv_cache_tokens(llm)
    # the scenarios really happened, in both runs
    assert baseline["preemptions"] > 0 and ours["preemptions"] > 0, "the batch was not preempted"
    assert ours["long_prompt_tokens"] > ENGINE["max_num_batched_tokens"], "the long prompt was not chunked"
    assert baseline["cached_tokens"] > 0 and ours["cached_tokens"] > 0, "no prefix-cache hit"
    # an uncompressed-size format holds exactly as many tokens as vLLM's own cache
    assert tokens == baseline["tokens"]
    _assert_same_greedy(baseline["batch"], ours["batch"], "16-prompt batch under preemption")
    _assert_same_greedy(baseline["long"], ours["long"], "chunked prefill")
    _assert_same_greedy(baseline["prefix"], ours["prefix"], "prefix caching")
