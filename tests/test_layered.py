"""The layered cache (:mod:`vllm_lowrank.layered`): ring blocks of exact tokens beside the compressed cache.

Store and read back bit for bit without touching the compressed slots or other blocks; attention against
float64 with the exact/compressed rule spelled out per query; and in vLLM on the CPU, the ring's effect on
perplexity and the prefix-caching guard.
"""

from __future__ import annotations

import pytest
import torch

from vllm_lowrank.codec import decode_layer, encode_layer
from vllm_lowrank.config import LowRankConfigError, ModelShape, parse
from vllm_lowrank.formats import SlotLayout, preset_format, ring_layout
from vllm_lowrank.formats import ring_tokens_per_block
from vllm_lowrank.layered import compressed_slot_mapping, layered_attention, read_exact, ring_blocks, store_exact
from vllm_lowrank.reference import read_slots, store
from vllm_lowrank.transforms import build_tensor_transform, LayerTransforms

from conftest import attention64

H, HQ, D, BS = 3, 9, 64, 16


def _setup(fmt: str, window: int, sink: int, length: int, dtype=torch.bfloat16, exact: str = "model"):
    """A poisoned cache, one request's block-table row (ring blocks first, shuffled ids) and its transforms."""
    lf = preset_format(fmt)
    layout = SlotLayout.build(lf, D, dtype)
    k = ring_blocks(window, sink, [ring_tokens_per_block(BS, layout.slot_bytes, ring_layout(D, dtype, exact))])
    num_blocks = k + (length + BS - 1) // BS + 3  # three blocks no one owns
    cache = torch.randint(0, 256, (num_blocks, H, BS, layout.slot_bytes), dtype=torch.uint8)
    row = torch.randperm(num_blocks)[:num_blocks - 3]
    transforms = LayerTransforms(build_tensor_transform(lf.k, H, D, None, None),
                                 build_tensor_transform(lf.v, H, D, None, None))
    return layout, transforms, cache, row, k


def _store_in_chunks(cache, row, k, layout, transforms, keys, values, chunks, window, sink, ring=None):
    start = 0
    for size in chunks:
        pos = torch.arange(start, start + size)
        req = torch.zeros(size, dtype=torch.long)
        slots = compressed_slot_mapping(row[None, :], req, pos, k, BS)
        store(keys[pos], values[pos], cache, slots, layout, transforms)
        store_exact(keys[pos], values[pos], cache, row[None, :k], req, pos, window, sink, ring)
        start += size


@pytest.mark.parametrize("fmt,window,sink,exact", [("int4", 5, 2, "model"), ("int8", 32, 1, "model"),
                                                   ("int4", 8, 0, "model"), ("int8", 0, 3, "model"),
                                                   ("int4", 5, 2, "int8"), ("int8", 32, 1, "int8")])
def test_ring_holds_the_last_window_and_first_sink_exactly(fmt, window, sink, exact):
    """The ring reads back the last W and first S tokens: bit for bit in the model dtype, as the codec's
    int8 (per-token scales) in int8."""
    length, dtype = 37, torch.bfloat16
    ring = ring_layout(D, dtype, exact)
    layout, transforms, cache, row, k = _setup(fmt, window, sink, length, dtype, exact)
    keys, values = torch.randn(length, H, D).to(dtype), torch.randn(length, H, D).to(dtype)
    before = cache.clone()
    _store_in_chunks(cache, row, k, layout, transforms, keys, values, (10, 1, 20, 1, 5), window, sink, ring)

    pos, k_ex, v_ex = read_exact(cache, row[:k], length, window, sink, ring)
    expect = sorted(set(range(max(0, length - window), length)) | set(range(min(sink, length))))
    assert pos.tolist() == expect
    identity = LayerTransforms(build_tensor_transform(ring.k.fmt, H, D, None, None),
                               build_tensor_transform(ring.v.fmt, H, D, None, None))
    k_want, v_want = decode_layer(encode_layer(keys[pos], values[pos], ring, identity), ring)
    assert torch.equal(k_ex, k_want) and torch.equal(v_ex, v_want)
    if exact == "model":
        assert torch.equal(k_ex, keys[pos].float()) and torch.equal(v_ex, values[pos].float())
    else:  # int8: within half a step of each token's absmax / 127
        assert ((k_ex - keys[pos].float()).abs() <= keys[pos].float().abs().amax(-1, keepdim=True) / 250).all()
        assert not torch.equal(k_ex, keys[pos].float())
    # the compressed slots hold exactly the codec's bytes: the ring writes did not clobber them
    slots = compressed_slot_mapping(row[None, :], torch.zeros(length, dtype=torch.long), torch.arange(length), k, BS)
    assert torch.equal(read_slots(cache, slots, layout), encode_layer(keys, values, layout, transforms))
    unowned = sorted(set(range(cache.shape[0])) - set(row.tolist()))
    assert torch.equal(cache[unowned], before[unowned])


def _dequantized(cache, row, k, length, layout, transforms):
    slots = compressed_slot_mapping(row[None, :], torch.zeros(length, dtype=torch.long), torch.arange(length), k, BS)
    k_lat, v_lat = decode_layer(read_slots(cache, slots, layout), layout)
    return transforms.k.reconstruct(k_lat, 1), transforms.v.reconstruct(v_lat, 1)


@pytest.mark.parametrize("fmt,window,sink,q_len", [("int4", 5, 2, 6), ("int4", 8, 1, 1), ("int8", 3, 0, 4),
                                                   ("int4", 0, 4, 1)])
def test_layered_attention_against_float64(fmt, window, sink, q_len):
    """Query t reads exact the positions p <= t in (t - W, t] or below S that are held exact (the ring as
    it was before this step, or this step's own tokens), the dequantized cache elsewhere."""
    length, dtype, scale = 41, torch.float32, D ** -0.5
    layout, transforms, cache, row, k = _setup(fmt, window, sink, length, dtype)
    keys, values = torch.randn(length, H, D) * 2, torch.randn(length, H, D)
    keys[0] *= 6  # an attention sink worth keeping exact
    # the step's tokens go into the compressed cache before attention and into the ring after it
    _store_in_chunks(cache, row, k, layout, transforms, keys, values, (length - q_len,), window, sink)
    pos = torch.arange(length - q_len, length)
    store(keys[pos], values[pos], cache, compressed_slot_mapping(row[None, :], torch.zeros_like(pos), pos, k, BS),
          layout, transforms)
    q = torch.randn(q_len, HQ, D)
    out = torch.full((q_len, HQ, D), float("nan"))
    first = length - q_len
    layered_attention(q, keys[first:], values[first:], cache, row, k, length, window, sink, layout, transforms,
                      scale, out)

    k_hat, v_hat = _dequantized(cache, row, k, length, layout, transforms)
    held = set(range(max(0, first - window), first)) | set(range(min(sink, first))) | set(range(first, length))
    expected = torch.empty(q_len, HQ, D, dtype=torch.float64)
    for i, t in enumerate(range(first, length)):
        exact = torch.tensor([p in held and (p > t - window or p < sink) for p in range(length)])[:, None, None]
        k_used, v_used = torch.where(exact, keys, k_hat), torch.where(exact, values, v_hat)
        expected[i] = attention64(q[i:i + 1], k_used, v_used, torch.tensor([t]), scale)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=2e-4)
    # and the compressed part matters: the all-dequantized answer differs
    plain = attention64(q, k_hat, v_hat, torch.arange(first, length), scale)
    assert (plain - expected).abs().max() > 1e-3


def test_exact_settings_are_checked():
    shape = ModelShape(30, 3, 64)
    assert parse({"format": "int4", "exact_window": 32, "exact_sink": 1}, shape).layered
    assert not parse({"format": "int4"}, shape).layered
    for bad in (-1, 1.5, True, "32"):
        with pytest.raises(LowRankConfigError, match="exact_window"):
            parse({"format": "int4", "exact_window": bad}, shape)
    assert parse({"format": "int4", "exact_window": 8, "exact_dtype": "int8"}, shape).exact_dtype == "int8"
    assert parse({"format": "int4", "exact_window": 8}, shape).exact_dtype == "model"
    for bad in ("fp8", "bf16", 8, None):
        with pytest.raises(LowRankConfigError, match="exact_dtype"):
            parse({"format": "int4", "exact_window": 8, "exact_dtype": bad}, shape)
    with pytest.raises(LowRankConfigError, match="no token is kept exact"):
        parse({"format": "int4", "exact_dtype": "int8"}, shape)


def test_layered_cache_in_vllm(smollm2):
    """In vLLM (CPU): the ring takes rotated int4's perplexity most of the way back to the uncompressed
    one, and a layered cache with prefix caching on is refused with a message that says what to do."""
    from vllm_lowrank.evaluation import FormatSpec, run_format
    from vllm_lowrank.textdata import eval_windows
    from transformers import AutoTokenizer

    windows = eval_windows(AutoTokenizer.from_pretrained(str(smollm2)), 1, 512)
    layered = {"format": "int4", "prefill_from_cache": True, "exact_window": 32, "exact_sink": 1}
    chunked = dict(max_num_batched_tokens=64, enable_chunked_prefill=True)
    runs = {name: run_format(smollm2, FormatSpec(name, settings), windows, kv_cache_memory_bytes=64 << 20, **kw)
            for name, settings, kw in (("vllm", None, {}), ("int4", {"format": "int4", "prefill_from_cache": True}, {}),
                                       ("layered", layered, {}), ("layered, chunks of 64", layered, chunked))}
    cost = {name: runs[name].nll - runs["vllm"].nll for name in runs}
    assert cost["int4"] > 0.01  # rotated int4 costs over 1% perplexity on this text
    assert abs(cost["layered"]) < cost["int4"] / 3
    # in chunks of 64 tokens, the window's older half and the sink come from the ring, not from the chunk
    assert abs(cost["layered, chunks of 64"] - cost["layered"]) < 2e-3

    with pytest.raises(Exception, match="prefix caching off"):
        run_format(smollm2, FormatSpec("layered", {"format": "int4", "exact_window": 32}), windows,
                   kv_cache_memory_bytes=64 << 20, enable_prefix_caching=True)


def test_block_table_rows_have_room_for_the_ring_with_mixed_page_sizes():
    """A plan mixes page sizes, so vLLM groups the layers in a ``UniformTypeKVCacheSpecs``, whose row width
    must count the ring blocks (the patch in ``patches/kv_cache_spec.py``)."""
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    from vllm_lowrank.layered import LayeredAttentionSpec
    from vllm_lowrank.patches import apply_all

    apply_all()
    cfg = SimpleNamespace(parallel_config=SimpleNamespace(decode_context_parallel_size=1))
    specs = {f"model.layers.{i}.self_attn.attn": LayeredAttentionSpec(
        block_size=BS, num_kv_heads=H, head_size=hs, head_size_v=hs, dtype=torch.uint8, ring_blocks=5)
        for i, hs in enumerate((16, 36, 66))}
    group = UniformTypeKVCacheSpecs.from_specs(specs)
    assert group is not None
    assert group.max_num_blocks_per_req(cfg, 1000) == -(-1000 // BS) + 5


def test_decode_reads_the_ring(smollm2):
    """Greedy decoding (float32) with rotated int4 and a window longer than every sequence: all attention
    reads the ring, so the tokens equal vLLM's uncompressed ones (up to near-ties), under preemption
    (recomputed requests rewrite their ring); plain int4 does not, so the comparison can fail."""
    from test_vllm_e2e import PROMPTS, _assert_same_greedy, _counter, _greedy

    from conftest import vllm_engine

    prompts = PROMPTS[:8]
    # 311 int4 blocks: a layered request holds 49 ring blocks (2 exact float32 tokens a block) and grows from 1 to
    # 4 blocks of its own, so the 6 admitted outgrow the cache
    engine = dict(kv_cache_memory_bytes=700 * 30 * 3 * 64 * 2 * 4, max_num_seqs=8, enable_prefix_caching=False,
                  max_model_len=256)
    outputs, preemptions = {}, {}
    for name, backend in (("vllm", {}), ("int4", {"format": "int4"}),
                          ("layered", {"format": "int4", "exact_window": 96, "exact_sink": 1})):
        extra = {"attention_backend": "lowrank", "additional_config": {"lowrank": backend}} if backend else {}
        with vllm_engine(smollm2, **extra, **engine) as llm:
            outputs[name] = llm.generate(prompts, _greedy(48))
            preemptions[name] = _counter(llm, "vllm:num_preemptions")
    assert preemptions["layered"] > 0, "the layered batch was not preempted"
    _assert_same_greedy(outputs["vllm"], outputs["layered"], "int4 with every token in the exact window")
    assert any(list(a.outputs[0].token_ids) != list(b.outputs[0].token_ids)
               for a, b in zip(outputs["vllm"], outputs["int4"])), "plain int4 matched: the test proves nothing"


def test_a_block_too_small_for_one_exact_token_is_refused():
    assert ring_blocks(32, 1, [4, 1]) == 33 and ring_blocks(0, 0, [0]) == 0
    with pytest.raises(LowRankConfigError, match="block-size"):
        ring_blocks(32, 1, [4, 0])


def test_capacity_counts_the_ring_blocks():
    """Capacity per sequence: a cache without a ring holds the slot ratio at every length; a ring's
    blocks cost ring_blocks / (blocks + ring_blocks) of it, by direct count of whole pages."""
    from vllm_lowrank.layered import capacity_ratio, ring_plan

    shape, dt, bs = ModelShape(30, 3, 64), torch.bfloat16, 16
    int8 = parse({"format": "int8"}, shape)
    slot = SlotLayout.build(int8.layer_format(0), 64, dt).slot_bytes
    for n in (1, 17, 1024, 8192):
        assert capacity_ratio(int8, 30, 64, dt, bs, n) == pytest.approx(2 * 64 * 2 / slot)
    ring = parse({"format": "int4", "exact_window": 32, "exact_sink": 1}, shape)
    k = ring_plan(ring, 30, 64, dt, bs)[0]
    int4 = 2 * 64 * 2 / SlotLayout.build(ring.layer_format(0), 64, dt).slot_bytes
    for n in (1000, 1024, 8192):
        blocks = -(-n // bs)
        assert capacity_ratio(ring, 30, 64, dt, bs, n) == pytest.approx(int4 * blocks / (blocks + k))
    assert k > 0 and capacity_ratio(ring, 30, 64, dt, bs, 1024) < capacity_ratio(ring, 30, 64, dt, bs, 8192) < int4


def test_new_token_slots_mark_cuda_graph_padding():
    """A CUDA-graph step pads the batch: tokens past the last request's (garbage positions, possibly past
    the block table) and padded requests of length 0 get slot -1 and request -1, with no out-of-bounds
    index; real tokens get column ring + p // block_size of their own row."""
    from vllm_lowrank.layered import new_token_slots

    ring, bs = 2, 4
    table = torch.randperm(40)[:3 * 6].view(3, 6).int()  # 3 rows (2 requests + a padded one), 6 columns
    qsl = torch.tensor([0, 3, 4, 5], dtype=torch.int32)  # request 2 is padding: one token, length 0
    seq_lens = torch.tensor([7, 10, 0], dtype=torch.int32)
    positions = torch.tensor([4, 5, 6, 9, 0, 10**6, -3, 77])  # tokens 5..7 are the step's padding
    slots, req = new_token_slots(table, qsl, 3, seq_lens, positions, ring, bs)
    expect = [int(table[0, ring + 1]) * bs + 0, int(table[0, ring + 1]) * bs + 1, int(table[0, ring + 1]) * bs + 2,
              int(table[1, ring + 2]) * bs + 1]
    assert slots.tolist() == expect + [-1] * 4
    assert req.tolist() == [0, 0, 0, 1] + [-1] * 4


def test_v2_gpu_runner_block_tables_get_room_for_the_ring():
    """vLLM's v2 GPU runner sizes block-table rows from max_model_len alone; patches/block_tables.py widens
    each group's rows by its ring blocks. Checked here on the CPU: the group arithmetic, the factory,
    and that the runner still builds its tables the way the patch wraps (a keyword the factory takes)."""
    import inspect

    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

    from vllm_lowrank.layered import LayeredAttentionSpec
    from vllm_lowrank.patches.block_tables import ring_blocks_per_group, widened

    def spec(hs, ring):
        return LayeredAttentionSpec(block_size=BS, num_kv_heads=H, head_size=hs, head_size_v=hs, dtype=torch.uint8,
                                    ring_blocks=ring)

    mixed = UniformTypeKVCacheSpecs.from_specs({f"model.layers.{i}.self_attn.attn": spec(hs, 65)
                                                for i, hs in enumerate((16, 36))})
    plain = FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=64, head_size_v=64, dtype=torch.bfloat16)
    config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in (mixed, spec(32, 9), plain)])
    assert ring_blocks_per_group(config) == [65, 9, 0]

    seen = {}
    make = widened(lambda *a, max_num_blocks_per_group, **k: seen.update(rows=max_num_blocks_per_group, k=k),
                   [65, 9, 0])
    make(block_sizes=[BS] * 3, max_num_blocks_per_group=[128, 128, 128], device="cpu")
    assert seen["rows"] == [193, 137, 128] and seen["k"]["device"] == "cpu"

    import vllm.v1.worker.gpu.model_runner as runner

    source = inspect.getsource(runner.GPUModelRunner.initialize_kv_cache)
    assert "BlockTables(" in source and "max_num_blocks_per_group=max_num_blocks_per_group" in source, (
        "vLLM's GPU runner no longer builds BlockTables as patches/block_tables.py expects")


def test_every_patch_refuses_a_vllm_it_was_not_written_for(monkeypatch, tmp_path):
    """Each monkeypatch (the block-table one added with the GPU ring among them) checks vLLM's version
    before touching anything, and says what to install."""
    import vllm

    from vllm_lowrank.patches import ALL, bench_gate, block_tables
    from vllm_lowrank.patches._compat import UnsupportedVLLMVersion

    monkeypatch.setattr(vllm, "__version__", "0.27.1")
    for module in (*ALL, block_tables):
        with pytest.raises(UnsupportedVLLMVersion, match="vllm==0.26.0"):
            module.apply()
    with pytest.raises(UnsupportedVLLMVersion, match="0.27.1"):
        bench_gate.apply(tmp_path / "gate")
