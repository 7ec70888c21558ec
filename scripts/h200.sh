#!/usr/bin/env bash
# The project's H200 runs, one device call per step, after the kit's steps 1-5 (../shared/gpu/README.md:
# vLLM in /tmp/site, SmolLM2 in /tmp/smollm2). Each step reinstalls this checkout into /tmp/site, writes
# its results under $OUT and prints its table last.
#
#   bash scripts/h200.sh serve          # `vllm serve` checks: SmolLM2 (3 formats) and the 8B shape (2), ~5 min
#   bash scripts/h200.sh ppl            # perplexity through the kernels, 40 windows, ~4 min; carry out/wiki-40.json
#                                       # and out/smollm2-135m-instruct-bfloat16-basis.safetensors (the CPU's basis)
#   bash scripts/h200.sh throughput-1b  # the 11-variant table of BENCHMARKS.md, ~7 min
#   bash scripts/h200.sh throughput-8b  # 8B shape, 8k context, 4 GiB of KV cache, 5 variants, ~6 min
#   bash scripts/h200.sh throughput-8b-b  # the same setting: auto, fp8 again (the ratios' anchors) and
#                                       # int8 (ours and vLLM's), vLLM's int4; ~6 min
#   bash scripts/h200.sh latency        # `vllm bench latency` at batch 1 and 32, 4 variants, ~4 min
#   bash scripts/h200.sh kernels        # the GPU kernel tests, ~6 min
#   bash scripts/h200.sh scales-ab      # decode with word-wide against 2-byte scale loads, num_stages 2 and 3, ~6 min;
#                                       # each run ends with the store rows: the in-kernel projection against the
#                                       # host's ('<format> (host proj.)'), 64 and 8192 tokens of the 8B shape
#   bash scripts/h200.sh bench-ring     # decode kernels with and without a layered cache's ring (last 64 and first
#                                       # token exact, bf16 and int8 rings), 1B and 8B shapes, batch 64/256, 1k/8k, ~4 min
#   bash scripts/h200.sh layered        # layered cache: ring and prefill kernel tests, `vllm serve` checks (3 formats) and
#                                       # perplexity (40 windows; carry as for ppl), side by side, ~5 min
#   bash scripts/h200.sh throughput-layered  # the 1B table: auto, fp8, the ceiling auto-ample (bf16 with 16 GiB
#                                       # of KV cache: the whole batch at once), int4 and four layered caches
#                                       # (int4 + last 32, int4 + last 8 in bf16 and in int8, the ring-chosen 4x
#                                       # plan), 8 engines side by side, ~7 min
#   bash scripts/h200.sh profile-layered  # torch.profiler over one 1B batch under memory pressure (1 GiB of KV,
#                                       # 128 prompts, 1024 in / 256 out): fp8, int4 and the 4x plan's layered cache, one
#                                       # after another (start-up each), cut at 9 min; profile-layered.log and
#                                       # profile-*.json; prints each variant's summary line
#
# Carry .gpukit/tok for the shapes with dummy weights. Background jobs are started and waited for in
# this one shell (a `pgrep -f` wait loop matches its own command line and never ends).
set -euo pipefail
step=${1:?usage: bash scripts/h200.sh serve|ppl|throughput-1b|throughput-8b|throughput-8b-b|latency|kernels|scales-ab|bench-ring|layered|throughput-layered|profile-layered}
OUT=${OUT:-/tmp/h200-out}
mkdir -p "$OUT"
source /tmp/site/env.sh
export VLLM_LOWRANK_SMOLLM2=/tmp/smollm2 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site --upgrade . >/dev/null 2>&1
TOK=.gpukit/tok
PLAN_2_75='{"plan": "bases/smollm2-135m.plans.json:2.75x", "basis": "bases/smollm2-135m.safetensors"}'
PLAN_4X_W64='{"plan": "bases/smollm2-135m.plans.json:4x", "exact_window": 64, "exact_sink": 1}'
PLAN_4X_W64_I8='{"plan": "bases/smollm2-135m.plans.json:4x", "exact_window": 64, "exact_sink": 1, "exact_dtype": "int8"}'
INT4_W32='{"format": "int4", "basis": "bases/smollm2-135m.safetensors", "exact_window": 32, "exact_sink": 1}'
SHARE=(--gpu-memory-utilization 0.05)  # engines side by side: vLLM then only checks this much is free

case $step in
  serve)
    python3 -P -m vllm_lowrank.serve_check --parallel 3 --out /tmp/sc-smollm2 \
      --formats int8 int4 "$PLAN_2_75" -- "${SHARE[@]}" --kv-cache-memory-bytes 2147483648 \
      > "$OUT/serve_smollm2.txt" 2>&1 &
    python3 -P -m vllm_lowrank.serve_check --parallel 2 --out /tmp/sc-8b --shape 8b --tokenizer $TOK \
      --formats int8 '{"format": "lowrank+int8", "rank_k": 64, "rank_v": 64}' \
      -- "${SHARE[@]}" --kv-cache-memory-bytes 4294967296 > "$OUT/serve_8b.txt" 2>&1 &
    wait
    grep -h "lowrank KV cache formats\|Graph capturing finished\|torch.compile took" /tmp/sc-*/serve-*.log \
      | cut -c1-300 > "$OUT/server_logs.txt" || true
    cat "$OUT/serve_smollm2.txt" "$OUT/serve_8b.txt" | grep -v "^(\|^INFO\|^WARNING" ;;
  ppl)
    python3 -P -m vllm_lowrank.evaluate --token-windows out/wiki-40.json --windows 40 \
      --plans bases/smollm2-135m.plans.json "${SHARE[@]}" \
      --formats vllm vllm-fp8_per_token_head vllm-int8_per_token_head vllm-int4_per_token_head \
                full int8 fp8 int4 plan:2x plan:2.75x plan:2.75x-s plan:3x-s \
                '{"format": "int8", "basis": "bases/smollm2-135m.safetensors", "smooth_keys": true}' \
                '{"format": "int4", "basis": "bases/smollm2-135m.safetensors"}' \
      --json "$OUT/ppl-40w.json" > "$OUT/ppl.log" 2>&1
    grep -A 18 "^smollm2" "$OUT/ppl.log" ;;
  throughput-1b)
    python3 -P scripts/bench_serving.py --shape 1b --tokenizer $TOK --parallel 6 --out "$OUT" --work /tmp/bs-1b \
      2>&1 | grep -v "it/s\]" | tail -16 ;;
  throughput-8b)
    python3 -P scripts/bench_serving.py --shape 8b --tokenizer $TOK --input-len 7936 --output-len 256 \
      --max-model-len 8192 --num-prompts 64 --kv-cache-memory-bytes 4294967296 --parallel 5 \
      --variants auto,fp8,lr:int4,lr:lowrank+int8-4x,lr:plan-2.75x --out "$OUT" --work /tmp/bs-8b \
      2>&1 | grep -v "it/s\]" | tail -10 ;;
  throughput-8b-b)
    python3 -P scripts/bench_serving.py --shape 8b --tokenizer $TOK --input-len 7936 --output-len 256 \
      --max-model-len 8192 --num-prompts 64 --kv-cache-memory-bytes 4294967296 --parallel 5 \
      --variants auto,fp8,int8_per_token_head,int4_per_token_head,lr:int8 --out "$OUT" --work /tmp/bs-8b-b \
      2>&1 | grep -v "it/s\]" | tail -10 ;;
  latency)
    python3 -P scripts/bench_serving.py --shape 1b --tokenizer $TOK --latency 1,32 --parallel 8 \
      --variants auto,fp8,lr:int8,lr:int4 --out "$OUT" --work /tmp/bs-lat 2>&1 | grep -v "it/s\]" | tail -12 ;;
  layered)
    python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "ring or prefill" > "$OUT/gpu_ring_tests.log" 2>&1 &
    python3 -P -m vllm_lowrank.serve_check --parallel 3 --out /tmp/sc-layered --formats "$INT4_W32" "$PLAN_4X_W64" \
      "$PLAN_4X_W64_I8" \
      -- "${SHARE[@]}" --kv-cache-memory-bytes 2147483648 --no-enable-prefix-caching > "$OUT/serve_layered.txt" 2>&1 &
    python3 -P -m vllm_lowrank.evaluate --token-windows out/wiki-40.json --windows 40 \
      --plans bases/smollm2-135m.plans.json "${SHARE[@]}" --formats vllm "$PLAN_4X_W64" "$PLAN_4X_W64_I8" "$INT4_W32" \
      --json "$OUT/ppl-layered-40w.json" > "$OUT/ppl-layered.log" 2>&1 &
    wait
    grep -h "lowrank KV cache formats\|lowrank attention on\|Graph capturing finished" /tmp/sc-layered/serve-*.log \
      | cut -c1-300 > "$OUT/server_logs_layered.txt" || true
    tail -3 "$OUT/gpu_ring_tests.log"; grep -v "^(\|^INFO\|^WARNING" "$OUT/serve_layered.txt" | tail -12
    grep -A 8 "^smollm2" "$OUT/ppl-layered.log" ;;
  throughput-layered)
    python3 -P scripts/bench_serving.py --shape 1b --tokenizer $TOK --parallel 8 --out "$OUT" --work /tmp/bs-1b-l \
      --variants auto,fp8,auto-ample,lr:int4,lr:int4-w32,lr:int4-w8,lr:int4-w8-int8,lr:ring-4x 2>&1 \
      | grep -v "it/s\]" | tail -12 ;;
  profile-layered)
    # `timeout` leaves the device call time to print what finished (each variant is printed when done)
    timeout 540 python3 -P scripts/profile_serving.py --shape 1b --tokenizer $TOK --kv-cache-memory-bytes 1073741824 \
      --variants fp8,lr:int4,lr:plan-4x-w64-int8 --num-prompts 128 --output-len 256 --out "$OUT" \
      > "$OUT/profile-layered.log" 2>&1 || echo "profile_serving.py exited with status $?"
    grep "^## " "$OUT/profile-layered.log" ;;
  bench-ring)
    python3 -P scripts/bench_kernels.py --models llama-1b,llama3-8b --batches 64,256 --contexts 1024,8192 --no-tune \
      --no-vllm --formats "int8,int4,lowrank+int8 1/4" --ring 64,1 --time-budget 420 --out "$OUT/bench_ring.json" \
      > "$OUT/bench_ring.log" 2>&1 || echo "bench_kernels.py exited with status $?"
    tail -30 "$OUT/bench_ring.log" ;;
  scales-ab)
    # decode with this checkout's word-wide scale loads (num_stages 2 and 3, 128- and 256-token tiles), then the
    # same run on a second install whose tile_scales has the previous 2-byte loads; FA3 bf16 as the yardstick
    AB=(--models llama-1b,llama3-8b --batches 64,256 --contexts 8192 --no-tune --stages 3,2:256,3:256 --time-budget 170
        --formats "full,int8,int4,lowrank+int8 1/2,lowrank+int8 1/4")
    python3 -P scripts/bench_kernels.py "${AB[@]}" --vllm-variants "FA3 bf16" --out "$OUT/scales-words.json" \
      > "$OUT/scales-words.log" 2>&1 || echo "words run exited with status $?"
    rm -rf /tmp/narrow /tmp/site-narrow && mkdir /tmp/narrow && cp -r pyproject.toml README.md vllm_lowrank triton_kernels patches bases /tmp/narrow/
    python3 benchmarks/h200-2026-12-05/narrow_scales.py /tmp/narrow/triton_kernels/common.py
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site-narrow /tmp/narrow >/dev/null 2>&1
    PYTHONPATH=/tmp/site-narrow:$PYTHONPATH python3 -P scripts/bench_kernels.py "${AB[@]}" --no-vllm \
      --out "$OUT/scales-narrow.json" > "$OUT/scales-narrow.log" 2>&1 || echo "narrow run exited with status $?"
    python3 -P scripts/compare_kernel_runs.py "$OUT/scales-narrow.json" "$OUT/scales-words.json" ;;
  kernels)
    python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_backend_kernels.py \
      -k "not interpreter" > "$OUT/gpu_tests.log" 2>&1 || true
    tail -5 "$OUT/gpu_tests.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
