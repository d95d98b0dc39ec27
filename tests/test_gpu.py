"""The CUDA path: NCCL through cupy with one rank, and the engine on a GPU against transformers.
Skipped without CUDA (but for the set-up of the real-shape kernel test, checked on CPU);
bench/gpu_check.sh runs these on the CUDA test machine."""

from __future__ import annotations

import pytest
import torch

from helpers import engine_config, generate, greedy, hf_greedy, random_prompts, ragged_attention_batch
from seesaw.transport.specs import GroupSpec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.gpu

# (cached tokens, new tokens) of a step at real shapes: decodes, a prompt, later chunks
REAL_SHAPE_ROWS = [(2000, 1)] * 24 + [(0, 700), (1500, 512), (31, 1), (4000, 1)]
BLOCK = 16


def real_shape_step(group: int, head_dim: int, kv_heads: int = 8):
    """The rows (RowShape, blocks drawn at random from a pool just large enough for them) and
    fp32 inputs of one step at real shapes; the pool's size follows from the rows."""
    from seesaw.model.attention import RowShape

    generator = torch.Generator().manual_seed(0)
    counts = [-(-(start + new) // BLOCK) for start, new in REAL_SHAPE_ROWS]
    num_blocks = sum(counts)
    permutation = torch.randperm(num_blocks, generator=generator).tolist()
    rows, used = [], 0
    for (start, new), count in zip(REAL_SHAPE_ROWS, counts):
        rows.append(RowShape(start, new, permutation[used : used + count]))
        used += count
    num_tokens = sum(new for _, new in REAL_SHAPE_ROWS)
    q = torch.randn(num_tokens, kv_heads * group, head_dim, generator=generator)  # [tokens, heads, hd]
    k, v = (torch.randn(num_tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(num_blocks, kv_heads, BLOCK, head_dim, generator=generator) for _ in range(2))
    return rows, (q, k, v, k_cache, v_cache)


def test_the_real_shape_step_builds_on_cpu():
    """The bf16 kernel test's rows fit their pool and their metadata builds, before a GPU is at hand."""
    from seesaw.model.attention import build_attention_batch

    rows, (q, _, _, k_cache, _) = real_shape_step(1, 64, kv_heads=1)
    assert all(len(row.block_ids) == -(-(row.start + row.num_new) // BLOCK) for row in rows)
    assert len({block for row in rows for block in row.block_ids}) == k_cache.shape[0]
    batch = build_attention_batch(rows, BLOCK, 64, "cpu")
    ragged = ragged_attention_batch(rows, BLOCK, 64, "cpu", kernel=lambda *args: None)
    assert batch.write_blocks.shape[0] == q.shape[0] == ragged.write_blocks.shape[0]


@needs_cuda
def test_one_rank_nccl_communicator_round_trip():
    from seesaw.transport.collective import NcclCommunicator, make_nccl_id

    device = torch.device("cuda:0")
    comm = NcclCommunicator(GroupSpec("world", [0], make_nccl_id()), 0, device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.arange(1024, dtype=dtype, device=device)
        expected = x.clone()
        comm.all_reduce(x)
        assert torch.equal(x, expected)
        assert torch.equal(comm.all_gather(x), expected)
        comm.broadcast(x, 0)
    comm.barrier()


@needs_cuda
@pytest.mark.parametrize(("group", "head_dim"), [(4, 128), (1, 64)])
def test_triton_paged_attention_in_bf16_at_real_shapes(group, head_dim):
    from seesaw.model.attention import build_attention_batch, paged_attention
    from seesaw.model.triton_attention import paged_attention_triton

    rows, (q, k, v, k_cache, v_cache) = real_shape_step(group, head_dim)
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), build_attention_batch(rows, BLOCK, head_dim, "cpu"))
    cuda = [t.to("cuda", torch.bfloat16) for t in (q, k, v, k_cache, v_cache)]
    batch = ragged_attention_batch(rows, BLOCK, head_dim, "cuda", paged_attention_triton)
    out = paged_attention(*cuda, batch)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=3e-2, atol=3e-2)


@needs_cuda
def test_the_sampling_race_draws_by_key_on_the_gpu():
    from seesaw.model.triton_sampling import exponential_race_triton

    expected = torch.tensor([0.5, 0.3, 0.15, 0.05], device="cuda")
    keys = torch.arange(20000, dtype=torch.int64, device="cuda") * 7919
    tokens = exponential_race_triton(expected.expand(20000, 4).contiguous(), keys)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / 20000, expected, atol=0.02)
    assert torch.equal(exponential_race_triton(expected.expand(3, 4).contiguous(), keys[:3]), tokens[:3])


@needs_cuda
def test_triton_norms_in_bf16_match_torch():
    from seesaw.model.llama import add_rms_norm, rms_norm
    from seesaw.model.triton_norm import add_rms_norm_triton, rms_norm_triton

    generator = torch.Generator().manual_seed(1)
    hidden, update = (torch.randn(300, 4096, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))
    weight = torch.rand(4096, generator=generator).to("cuda", torch.bfloat16)
    torch.testing.assert_close(rms_norm_triton(hidden, weight, 1e-5), rms_norm(hidden, weight, 1e-5), rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(add_rms_norm_triton(hidden, update, weight, 1e-5), add_rms_norm(hidden, update, weight, 1e-5)):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def _cuda(folder, **cache):
    return engine_config(str(folder), model={"device": "cuda", "dtype": "float32"}, cache={"kv_cache_gb": 0.05, **cache})


@needs_cuda
def test_cuda_float32_greedy_matches_transformers(tiny_models):
    folder = tiny_models["llama-gqa-tied"]
    prompts = random_prompts(6, [1, 9, 40, 100], seed=4)
    results = generate(_cuda(folder), [{"sampling": greedy(12), "prompt_token_ids": p} for p in prompts])
    assert [r.token_ids for r in results] == hf_greedy(folder, prompts, 12)


@needs_cuda
def test_cuda_bfloat16_runs_and_mostly_agrees_with_float32(tiny_models):
    folder = tiny_models["qwen2-bias"]
    prompts = random_prompts(8, [5, 30, 70], seed=6)
    requests = [{"sampling": greedy(8), "prompt_token_ids": p} for p in prompts]
    full = generate(_cuda(folder), requests)
    half = generate(engine_config(str(folder), model={"device": "cuda"}, cache={"kv_cache_gb": 0.05}), requests)
    first_tokens = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(full, half))
    assert first_tokens >= 6


@needs_cuda
def test_cuda_eviction_through_the_registered_host_buffer_keeps_outputs(tiny_models):
    folder = tiny_models["llama-gqa-tied"]
    prompts = random_prompts(12, [20, 45, 70], seed=9)
    requests = [{"sampling": greedy(40), "prompt_token_ids": p} for p in prompts]
    stats: dict = {}
    tight = generate(_cuda(folder, kv_cache_gb=24 * 16 * 3 * 2 * 2 * 16 * 4 / 2**30), requests, stats=stats)
    roomy = generate(_cuda(folder), requests)
    assert stats["evictions"] > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]


@needs_cuda
def test_cuda_two_steps_in_flight_give_the_tokens_of_one(tiny_models):
    folder = tiny_models["llama-gqa-tied"]
    prompts = random_prompts(10, [3, 40, 90], seed=12)
    requests = [{"sampling": greedy(10), "prompt_token_ids": p} for p in prompts]
    ahead: dict = {}
    one = generate(engine_config(str(folder), model={"device": "cuda", "dtype": "float32"},
                                 cache={"kv_cache_gb": 0.05}, scheduler={"overlap": False}), requests)
    two = generate(_cuda(folder), requests, stats=ahead)
    assert ahead["rows_ahead"] > 0 and [r.token_ids for r in two] == [r.token_ids for r in one]


@needs_cuda
def test_cuda_kv_pool_sized_by_a_profiling_step(tiny_models):
    folder = str(tiny_models["llama-gqa-tied"])
    metrics: list = []
    config = engine_config(folder, model={"device": "cuda"}, cache={"kv_cache_gb": None, "memory_fraction": 0.5})
    results = generate(config, [{"sampling": greedy(4), "prompt_token_ids": [5, 6, 7]}], metrics=metrics)
    assert results[0].error is None
    free, total = torch.cuda.mem_get_info()
    # Half the card, less what was in use: tens of thousands of this tiny model's blocks.
    assert metrics[0].kv.device_blocks > 10_000


@needs_cuda
def test_cuda_rates_are_measured_within_reach_of_a_datacenter_gpu():
    """calibrate --device cuda's micro-benchmarks at Llama 3 8B's shapes: every rate measured, and
    each within what GPUs of this project's catalogue can reach."""
    from seesaw.calibrate.measure_gpu import cuda_rates

    rates = cuda_rates(hidden=4096, intermediate=14336, token_budget=8192)
    assert 20e12 < rates["model_matmul_flops"] <= rates["peak_flops"] * 1.2 < 2500e12
    assert 100e9 < rates["weight_stream_bandwidth"] < 6e12 and 100e9 < rates["copy_bandwidth"] < 12e12
    assert 5e12 < rates["attention_flops"] < 2500e12
    assert 3e9 < rates["host_bandwidth"] < 150e9
    assert rates["total_memory"] > 10 << 30 and rates["device_name"]
