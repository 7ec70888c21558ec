"""Bad settings fail at start-up with a message that names what was wrong and what would be accepted.

Each case goes through ``LLM(...)``, as a user would: the plugin checks the settings when vLLM builds
its engine config, in the user's own process, before any engine process starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_lowrank.basis import orthonormal_basis_file
from vllm_lowrank.config import LowRankConfigError, ModelShape, parse
from vllm_lowrank.formats import TensorFormat

SMOL = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64)


def _llm(model, **kwargs):
    from vllm import LLM

    return LLM(str(model), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=32 << 20,
               max_model_len=256, **kwargs)


@pytest.fixture(scope="module")
def basis_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bases")
    files = {
        "good": orthonormal_basis_file(30, 3, 64, rank=32),
        "layers": orthonormal_basis_file(12, 3, 64),
        "heads": orthonormal_basis_file(30, 4, 64),
        "head_dim": orthonormal_basis_file(30, 3, 128),
    }
    paths = {}
    for name, bf in files.items():
        paths[name] = d / f"{name}.safetensors"
        bf.save(paths[name])
    paths["unreadable"] = d / "unreadable.safetensors"
    paths["unreadable"].write_bytes(b"this is not a safetensors file")
    paths["missing"] = d / "does-not-exist.safetensors"
    return paths


BAD_SETTINGS = [
    ({"format": "int5"}, r"unknown format 'int5'.*accepted: a preset \(full, int8, fp8, int4, lowrank"),
    ({"format": {"k": "int8", "q": "int8"}}, r"a per-tensor format is \{'k': \.\.\., 'v': \.\.\.\}"),
    ({"format": "lowrank", "rank_k": 0, "rank_v": 16, "basis": "good"}, r"rank_k=0 is out of range.*1 to head_dim=64"),
    ({"format": "lowrank", "rank_k": 16, "rank_v": -4, "basis": "good"}, r"rank_v=-4 is out of range"),
    ({"format": "lowrank", "rank_k": 96, "rank_v": 16, "basis": "good"}, r"rank_k=96 is out of range.*head_dim=64"),
    ({"format": "r80"}, r"rank 80 is out of range.*from 1 to head_dim=64"),
    ({"format": "r0+int8"}, r"rank 0 is out of range"),
    ({"format": "lowrank", "rank_k": 16, "rank_v": 16}, r"projects onto a basis, but no basis file is set"),
    ({"format": "lowrank", "rank_k": 48, "rank_v": 16, "basis": "good"}, r"rank 48 exceeds the 32 basis vectors"),
    ({"format": "lowrank"}, r"needs ranks: set 'rank_k' and 'rank_v'"),
    ({"format": "int8", "basis": "missing"}, r"does not exist"),
    ({"format": "int8", "basis": "unreadable"}, r"is not a readable safetensors file"),
    ({"format": "int8", "basis": "layers"}, r"does not match the model: layers: file has 12, model has 30"),
    ({"format": "int8", "basis": "heads"}, r"KV heads: file has 4, model has 3"),
    ({"format": "int8", "basis": "head_dim"}, r"head_dim: file has 128, model has 64"),
    ({"format": "int8", "layers": {"30": "fp8"}}, r"layer 30 does not exist; the model has layers 0..29"),
    ({"format": "int8", "layers": {"first": "fp8"}}, r"'first' is not a layer number"),
    ({"format": "int8", "offset": True}, r"offset=true needs a basis file with calibrated offsets"),
    ({"format": "int8", "offset": "auto"}, r"offset='auto': expected true or false"),
    ({"format": "int8", "rank": 16}, r"unknown lowrank setting\(s\) \['rank'\]; accepted: format, rank_k"),
    ({"format": "int8", "rank_k": 32}, r"rank_k/rank_v are set, but no format takes them.*'lowrank\+int8'"),
    ({"format": "r32+int8", "rank_v": 16, "basis": "good"}, r"rank_k/rank_v are set, but no format takes them"),
]


def _resolve(settings: dict, basis_files: dict[str, Path]) -> dict:
    if "basis" in settings:
        settings = {**settings, "basis": str(basis_files[settings["basis"]])}
    return settings


@pytest.mark.parametrize("settings,message", BAD_SETTINGS, ids=[json.dumps(s[0]) for s in BAD_SETTINGS])
def test_bad_setting_is_refused(settings, message, basis_files):
    with pytest.raises(LowRankConfigError, match=message):
        parse(_resolve(settings, basis_files), SMOL)


@pytest.mark.parametrize("settings", [
    {"format": "full"}, {"format": "int4"}, {"format": "r32+int8", "basis": "good"},
    {"format": "lowrank+fp8", "rank_k": 32, "rank_v": 8, "basis": "good"},
    {"format": {"k": "hadamard+int4", "v": "fp8"}, "layers": {"0": {"k": "r16", "v": "model"}}, "basis": "good"},
    {"format": "int8", "rank_k": 16, "rank_v": 16, "layers": {"3": "lowrank"}, "basis": "good"},
])
def test_good_setting_is_accepted(settings, basis_files):
    cfg = parse(_resolve(settings, basis_files), SMOL)
    assert all(cfg.layer_format(i) is not None for i in range(SMOL.num_layers))


# --- through LLM(...), the user's entry point

@pytest.mark.vllm
@pytest.mark.parametrize("settings,message", [BAD_SETTINGS[0], BAD_SETTINGS[2], BAD_SETTINGS[13]],
                         ids=["unknown-format", "rank-0", "basis-mismatch"])
def test_llm_refuses_bad_setting(smollm2, basis_files, settings, message):
    with pytest.raises(LowRankConfigError, match=message):
        _llm(smollm2, attention_backend="lowrank", additional_config={"lowrank": _resolve(settings, basis_files)})


@pytest.mark.vllm
def test_llm_refuses_settings_without_backend(smollm2):
    with pytest.raises(LowRankConfigError, match="add --attention-backend lowrank"):
        _llm(smollm2, additional_config={"lowrank": {"format": "int8"}})


@pytest.mark.vllm
def test_llm_refuses_kv_cache_dtype(smollm2):
    with pytest.raises(LowRankConfigError, match="cannot be combined with the lowrank backend"):
        _llm(smollm2, attention_backend="lowrank", kv_cache_dtype="fp8")


# tiny configs of model families with features the backend does not support (weights never load)
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
UNSUPPORTED_MODELS = {
    "sliding-window": (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=32,
                            head_dim=16, **_BASE), r"sliding-window attention \(window 32\)"),
    "soft-capping": (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16,
                          attn_logit_softcapping=50.0, query_pre_attn_scalar=16, **_BASE),
                     r"attention logit soft-capping"),
    "alibi": (dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=64, n_layer=2, n_head=4,
                   vocab_size=256), r"ALiBi"),
    "mla": (dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], kv_lora_rank=32,
                 q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                 num_experts_per_tok=2, first_k_dense_replace=2, moe_intermediate_size=32, **_BASE), r"MLA"),
    "encoder-decoder": (dict(model_type="whisper", architectures=["WhisperForConditionalGeneration"], d_model=64,
                             encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                             decoder_attention_heads=4, vocab_size=256, num_mel_bins=80),
                        r"encoder-decoder attention"),
}


@pytest.mark.vllm
@pytest.mark.parametrize("feature", list(UNSUPPORTED_MODELS))
def test_llm_refuses_unsupported_model(feature, tmp_path):
    from transformers import AutoConfig

    cfg, message = UNSUPPORTED_MODELS[feature]
    AutoConfig.for_model(**cfg).save_pretrained(tmp_path)
    with pytest.raises(LowRankConfigError, match=message):
        _llm(tmp_path, attention_backend="lowrank", load_format="dummy", skip_tokenizer_init=True)


PLANS = Path(__file__).resolve().parent.parent / "bases" / "smollm2-135m.plans.json"


def test_plan_expands_to_its_layers_and_basis():
    plans = json.loads(PLANS.read_text())["plans"]
    for name in ("2x", "3x"):
        cfg = parse({"plan": f"{PLANS}:{name}"}, SMOL)
        for layer, fmt in plans[name]["layers"].items():
            got = cfg.layer_format(int(layer))
            assert (str(got.k), str(got.v)) == (str(TensorFormat.parse(fmt["k"])), str(TensorFormat.parse(fmt["v"])))
        needs_basis = any(f.startswith("r") for kv in plans[name]["layers"].values() for f in kv.values())
        assert (cfg.basis is not None) >= needs_basis
    # a key given beside the plan wins over the plan's own
    assert str(parse({"plan": f"{PLANS}:2x", "layers": {"0": "fp8"}}, SMOL).layer_format(0)) == "K=fp8 V=fp8"
    # the 2x plan runs without offsets (its settings) and then needs no basis; offsets asked for beside
    # it bring the basis file beside the plans file
    assert parse({"plan": f"{PLANS}:2x"}, SMOL).basis is None
    cfg = parse({"plan": f"{PLANS}:2x", "offset": True}, SMOL)
    assert cfg.basis is not None and cfg.use_offsets


def test_plan_by_bare_file_name_is_the_shipped_one(tmp_path, monkeypatch):
    """``smollm2-135m.plans.json:2.75x-s`` works from any folder (the plans ship with the plugin); a file
    of that name in the working folder wins."""
    monkeypatch.chdir(tmp_path)
    cfg = parse({"plan": "smollm2-135m.plans.json:2.75x-s"}, SMOL)
    ref = parse({"plan": f"{PLANS}:2.75x-s"}, SMOL)
    assert [str(cfg.layer_format(i)) for i in range(30)] == [str(ref.layer_format(i)) for i in range(30)]
    assert cfg.smooth_keys and cfg.basis is not None
    local = {"plans": {"2.75x-s": {"layers": {str(i): {"k": "fp8", "v": "fp8"} for i in range(30)}}}}
    (tmp_path / "smollm2-135m.plans.json").write_text(json.dumps(local))
    assert str(parse({"plan": "smollm2-135m.plans.json:2.75x-s"}, SMOL).layer_format(3)) == "K=fp8 V=fp8"


@pytest.mark.parametrize("ref,message", [
    ("nowhere.json:2x", r"expected '<plans file>:<plan name>'"),
    ("sub/smollm2-135m.plans.json:2x", r"expected '<plans file>:<plan name>'"),
    (f"{PLANS}", r"expected '<plans file>:<plan name>'"),
    (f"{PLANS}:9x", r"no plan '9x' in .*; it has 2x"),
])
def test_bad_plan_is_refused(ref, message):
    with pytest.raises(LowRankConfigError, match=message):
        parse({"plan": ref}, SMOL)
