"""Llama model shapes with dummy weights, for speed work without checkpoints (``--load-format dummy``).

``1b``: the shape of shared/gpu/README.md's reference table (hidden 2048, 16 layers, 32/8 heads,
head_dim 64, vocab 128256); ``8b``: Llama-3-8B (hidden 4096, 32 layers, 32/8 heads, head_dim 128).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """How many token ids the tokenizer in ``tokenizer_dir`` can turn into text (added tokens included)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def make_model(shape: str, tokenizer_dir: Path, out: Path, vocab_from_tokenizer: bool = False) -> Path:
    """A model folder with the shape's config.json (dummy weights) and a borrowed tokenizer.

    The shape's own vocabulary (128256) keeps the timings honest, but random weights then mostly pick ids
    the borrowed tokenizer lacks, which decode to empty text; ``vocab_from_tokenizer`` sizes the
    vocabulary to the tokenizer instead, for checks that read the generated text.
    """
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    if vocab_from_tokenizer:
        cfg["vocab_size"] = tokenizer_vocab_size(tokenizer_dir)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def make_basis(shape: str, out: Path) -> Path:
    """A random orthonormal basis file for the shape (speed work: low-rank formats need a basis)."""
    from .basis import orthonormal_basis_file

    s = SHAPES[shape]
    orthonormal_basis_file(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"],
                           model=f"random orthonormal for the {shape} shape").save(out)
    return out
