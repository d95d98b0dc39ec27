"""Device memory plans checked against the cards the GPU runs use (80 GB H100, 141 GB H200), with
their figures injected: nothing here needs a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from seesaw.layout import Layout, shard_for
from seesaw.model.llama import ShardModel
from seesaw.model.presets import PRESETS
from seesaw.model.spec import ModelSpec
from seesaw.runtime.arena import block_elements, measure
from seesaw.runtime.memory_plan import (
    GIB,
    DeviceMemory,
    DevicePlan,
    kv_pool_bytes,
    sampler_bytes,
    step_activation_bytes,
)
from seesaw.runtime.step_bounds import step_bytes_per_block

CARDS = {"H100 80GB": 80 * 10**9, "H200 141GB": 141 * 10**9}
LLAMA3_8B = ModelSpec.from_hf_config(dict(PRESETS["llama3-8b"]))


def _reshard_bench():
    path = Path(__file__).parents[1] / "bench" / "reshard.py"
    spec = importlib.util.spec_from_file_location("reshard_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("card", CARDS)
def test_the_gpu_checks_throughput_run_fits_without_eviction(card):
    """dummy:llama3-8b at t1 in bf16, 256 x (512 + 128): weights, the CUDA context, the largest
    step (2,048 tokens over 256 sampling rows, the sampler's sort buffers included) and every
    request's KV at once fit in 90% of the card."""
    total = CARDS[card]
    shard = shard_for(Layout.parse("t1"), LLAMA3_8B.shape, 0)
    weights = measure(lambda allocate: ShardModel(LLAMA3_8B, shard, allocate), torch.bfloat16)
    context = 600 << 20
    qkv = (LLAMA3_8B.num_heads + 2 * LLAMA3_8B.num_kv_heads) * LLAMA3_8B.head_dim
    peak = (step_activation_bytes(LLAMA3_8B.hidden_size, qkv, LLAMA3_8B.intermediate_size, LLAMA3_8B.vocab_size,
                                  2048, 256, 2) + sampler_bytes(256, LLAMA3_8B.vocab_size))
    pool = kv_pool_bytes(DeviceMemory(total - weights - context, total), 0.9, peak)
    block_bytes = block_elements(shard, 16, LLAMA3_8B.head_dim) * 2
    # As the worker cuts it: the padding page first, then blocks that each bring their step buffers'
    # share (the block table at the preset's 131,072-token length: 32 KiB a block).
    num_blocks = (pool - block_bytes) // (block_bytes + step_bytes_per_block(LLAMA3_8B.max_position, 16))
    needed = 256 * -(-(512 + 128) // 16)
    assert sampler_bytes(256, LLAMA3_8B.vocab_size) > GIB // 2  # what the pool would have taken before
    assert num_blocks >= needed, f"{card}: {num_blocks} blocks for {needed} blocks of KV"


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("layouts", ["t1", "p2,t2"])
def test_the_reshard_bench_fits_each_card(card, layouts):
    """bench/reshard.py on dummy:llama3-8b with 1 GiB of KV: a shard and a small pool, no more."""
    bench = _reshard_bench()
    parsed = [Layout.parse(text) for text in layouts.split(",")]
    block_bytes = LLAMA3_8B.num_layers * 2 * LLAMA3_8B.num_kv_heads * 16 * LLAMA3_8B.head_dim * 2
    num_blocks = GIB // block_bytes
    for rank in range(parsed[0].world_size):
        plan = bench.device_plan(LLAMA3_8B, parsed, rank, "bfloat16", num_blocks, block_bytes)
        plan.check(CARDS[card], 0.95, f"rank {rank}")
        assert set(plan.parts) == {"weights", "KV pool"}


def test_a_plan_past_the_card_names_its_parts():
    plan = DevicePlan().add("weights", 16 * GIB).add("KV pool", 60 * GIB)
    with pytest.raises(ValueError, match=r"rank 0: 76.00 GiB \(weights 16.00, KV pool 60.00 GiB\) does not fit 90%"):
        plan.check(80 * 10**9, 0.9, "rank 0")
