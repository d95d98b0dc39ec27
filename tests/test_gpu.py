"""The CUDA path: NCCL through cupy with one rank, and the engine on a GPU against transformers.
Skipped without CUDA; bench/gpu_check.sh runs these on the CUDA test machine."""

from __future__ import annotations

import pytest
import torch

from helpers import engine_config, generate, greedy, hf_greedy, random_prompts
from seesaw.messages import GroupSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


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


def _cuda(folder, **cache):
    return engine_config(str(folder), model={"device": "cuda", "dtype": "float32"}, cache={"kv_cache_gb": 0.05, **cache})


def test_cuda_float32_greedy_matches_transformers(tiny_models):
    folder = tiny_models["llama-gqa-tied"]
    prompts = random_prompts(6, [1, 9, 40, 100], seed=4)
    results = generate(_cuda(folder), [{"sampling": greedy(12), "prompt_token_ids": p} for p in prompts])
    assert [r.token_ids for r in results] == hf_greedy(folder, prompts, 12)


def test_cuda_bfloat16_runs_and_mostly_agrees_with_float32(tiny_models):
    folder = tiny_models["qwen2-bias"]
    prompts = random_prompts(8, [5, 30, 70], seed=6)
    requests = [{"sampling": greedy(8), "prompt_token_ids": p} for p in prompts]
    full = generate(_cuda(folder), requests)
    half = generate(engine_config(str(folder), model={"device": "cuda"}, cache={"kv_cache_gb": 0.05}), requests)
    first_tokens = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(full, half))
    assert first_tokens >= 6


def test_cuda_eviction_through_the_registered_host_buffer_keeps_outputs(tiny_models):
    folder = tiny_models["llama-gqa-tied"]
    prompts = random_prompts(12, [20, 45, 70], seed=9)
    requests = [{"sampling": greedy(40), "prompt_token_ids": p} for p in prompts]
    stats: dict = {}
    tight = generate(_cuda(folder, kv_cache_gb=24 * 16 * 3 * 2 * 2 * 16 * 4 / 2**30), requests, stats=stats)
    roomy = generate(_cuda(folder), requests)
    assert stats["evictions"] > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]
