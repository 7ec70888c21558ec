"""Triton kernels that store into and attend over compressed KV slots (``vllm_lowrank.kernels``)."""
