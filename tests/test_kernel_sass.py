"""The kernels' sm_90 machine code, compiled without a GPU (``scripts/kernel_sass.py``).

Guards properties of the compiled main loop that the CPU interpreter cannot see and that made the
quantized formats 1.5-2x slower when they were lost: tensor-core dots for every format (narrow latents
once compiled to CUDA-core FMAs), no conversion-unit instructions for int8/int4 codes (they become fp16
on their bits), and no one-byte shared-memory loads for quantized V (stored transposed for P @ V).
Runs the script in a subprocess: Triton must be in compiled mode, while the kernel tests put this
process's Triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["full", "int8", "fp8", "int4", "lowrank+int8:16:16", "lowrank+int8:32:32"]


@pytest.fixture(scope="module")
def loops(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sass") / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_sass.py"), "--formats", ",".join(FORMATS),
                           "--head-dim", "64", "--json", str(out)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is not available on this platform")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _count(opcodes: dict, prefix: str) -> int:
    return sum(n for op, n in opcodes.items() if op.startswith(prefix))


@pytest.mark.parametrize("spec", FORMATS)
def test_loop_uses_tensor_cores(loops, spec):
    ops = loops[spec]["opcodes"]
    assert loops[spec]["loop_instructions"] > 0, f"{spec}: no loop found"
    assert _count(ops, "HMMA") > 0, f"{spec}: dots compiled without tensor cores: {ops}"


@pytest.mark.parametrize("spec", ["int8", "int4", "lowrank+int8:16:16", "lowrank+int8:32:32"])
def test_codes_convert_without_conversion_units(loops, spec):
    ops = loops[spec]["opcodes"]
    slow = {op: n for op, n in ops.items() if op.startswith(("I2F", "F2F.", "I2I"))}
    assert not slow, f"{spec}: conversion-unit instructions in the loop: {slow}"


@pytest.mark.parametrize("spec", ["int8", "fp8", "int4", "lowrank+int8:32:32"])
def test_no_byte_shared_memory_loads(loops, spec):
    ops = loops[spec]["opcodes"]
    assert _count(ops, "LDS.U8") == 0 and _count(ops, "LDS.S8") == 0, f"{spec}: byte-wise shared loads: {ops}"


@pytest.fixture(scope="module")
def every_kernel(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("every") / "every.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "scripts" / "kernel_sass.py"), "--every-kernel",
                           "--head-dim", "64", "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is not available on this platform")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles(every_kernel):
    """Every kernel variant that serving launches (store, query projection, decode split and merge, prefill;
    with a layered cache's ring in the model dtype and in int8) compiles for sm_90: the interpreter tests
    cannot see compile-only errors (a constexpr missing from a launch, an op the GPU lowering lacks)."""
    kinds = {name.split()[0] for name in every_kernel}
    assert kinds == {"store", "query", "decode", "merge", "prefill"}, kinds
    assert all(r["REG"] > 0 for r in every_kernel.values()), every_kernel


@pytest.mark.parametrize("fmt", ["int4", "lowrank+int8"])
def test_ring_program_keeps_the_registers(every_kernel, fmt):
    """The layered decode's ring program shares the split kernel's registers, so it sets them for every
    compressed split too. With float32 CUDA-core dots it took int4 from 127 to 190 and lowrank+int8 from 96
    to 195 registers a thread (fewer programs per SM); with tensor-core dots it adds at most a quarter of
    the 128 that keep four 4-warp programs on an SM, and never spills."""
    base = every_kernel[f"decode {fmt}"]["REG"]
    for ring in ("model", "int8"):
        r = every_kernel.get(f"decode {fmt}, {ring} ring")
        if r is None:
            continue
        assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{fmt}, {ring} ring: spills ({r})"
        assert r["REG"] <= base + 32, f"{fmt}, {ring} ring: {r['REG']} registers against {base} without the ring"


def test_merge_does_not_spill(every_kernel):
    """The merge kernel rebuilds ``P_v o_lat + c_v``: as an IEEE float32 dot (CUDA-core FMAs) it took 255
    registers and spilled even at head_dim 64; TF32x3 tensor-core dots (about float32's accuracy) do not."""
    for name, r in every_kernel.items():
        if name.startswith("merge"):
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{name}: spills ({r})"
