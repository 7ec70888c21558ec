"""vllm-lowrank: a vLLM plugin that keeps the paged KV cache compressed (low rank, INT8/FP8/INT4)."""

__version__ = "0.1.0"
