"""The engine end to end on one worker: batching does not change greedy outputs, memory pressure
moves requests through the host buffer without changing them, and bad requests fail alone."""

from __future__ import annotations

import asyncio

import pytest

from helpers import engine_config, generate, greedy, random_prompts, resolve_model
from seesaw.sampling import SamplingParams

MAX_TOKENS = 10


def test_greedy_output_does_not_depend_on_the_batch(tiny_models):
    folder = str(tiny_models["llama-gqa-tied"])
    lengths = [3, 140, 17, 64, 1, 90, 33, 120]
    prompts = random_prompts(32, lengths, seed=5)
    requests = [{"sampling": greedy(MAX_TOKENS), "prompt_token_ids": p} for p in prompts]
    # 48 tokens a step: long prompts are split over several chunks and share steps with decodes.
    config = engine_config(folder, scheduler={"max_num_batched_tokens": 48})
    together = generate(config, requests)
    alone = generate(config, requests, sequential=True)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert all(len(r.token_ids) == MAX_TOKENS for r in together)


def _pressure_run(folder: str, host_buffer_gb: float):
    prompts = random_prompts(12, [20, 45, 70], seed=9)
    requests = [{"sampling": greedy(40), "prompt_token_ids": p} for p in prompts]
    # 24 blocks of 16 tokens: far less than the 12 requests need at once.
    tight = engine_config(folder, cache={"kv_cache_gb": 24 * 16 * 3 * 2 * 2 * 16 * 4 / 2**30,
                                         "host_buffer_gb": host_buffer_gb})
    roomy = engine_config(folder)
    stats: dict = {}
    return generate(tight, requests, stats=stats), generate(roomy, requests), stats


def test_eviction_to_the_host_buffer_keeps_outputs(tiny_models):
    tight, roomy, stats = _pressure_run(str(tiny_models["llama-gqa-tied"]), host_buffer_gb=0.05)
    assert stats["evictions"] > 0 and stats["restores"] == stats["evictions"] and stats["recomputes"] == 0
    assert [r.error for r in tight] == [None] * len(tight)
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]


def test_recompute_when_the_host_buffer_is_absent(tiny_models):
    tight, roomy, stats = _pressure_run(str(tiny_models["llama-gqa-tied"]), host_buffer_gb=0.0)
    assert stats["recomputes"] > 0 and stats["restores"] == 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]


def test_bad_requests_fail_alone_with_a_reason(tiny_models):
    folder = str(tiny_models["llama-gqa-tied"])
    config = engine_config(folder, model={"max_model_len": 64})
    results = generate(config, [
        {"sampling": greedy(5), "prompt_token_ids": [5] * 70},
        {"sampling": greedy(5), "prompt_token_ids": []},
        {"sampling": greedy(5), "prompt_token_ids": [5, 99999]},
        {"sampling": greedy(5), "prompt": "text needs a tokenizer"},
        {"sampling": greedy(5), "prompt_token_ids": [5, 6, 7]},
    ])
    assert "context is 64 tokens" in results[0].error and results[0].status_code == 400
    assert "prompt is empty" in results[1].error
    assert "within the vocabulary" in results[2].error
    assert "no tokenizer" in results[3].error
    assert results[4].error is None and len(results[4].token_ids) == 5


def test_the_local_client_refuses_malformed_chat_messages_and_goes_on(tiny_models):
    from seesaw.engine import Engine
    from seesaw.frontend.local import LocalClient

    config = engine_config(str(tiny_models["llama-gqa-tied"]))

    async def main():
        async with Engine(config, resolve_model(config.model.model, config.cache_dir)) as engine, \
                LocalClient(engine, "test") as client:
            with pytest.raises(ValueError, match=r"messages\[1\]\.role must be one of"):
                client.submit(greedy(2), messages=[{"role": "user", "content": "x"}, {"role": "robot"}])
            return await client.generate(greedy(2), prompt_token_ids=[5, 6])

    result = asyncio.run(asyncio.wait_for(main(), 120))
    assert result.error is None and len(result.token_ids) == 2


def test_seeded_sampling_is_reproducible_across_batches(tiny_models):
    folder = str(tiny_models["qwen2-bias"])
    sampling = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    prompts = random_prompts(6, [5, 30, 12], seed=3)
    config = engine_config(folder)
    first = generate(config, [{"sampling": sampling, "prompt_token_ids": p} for p in prompts])
    alone = generate(config, [{"sampling": sampling, "prompt_token_ids": prompts[4]}])
    assert first[4].token_ids == alone[0].token_ids
    assert len({tuple(r.token_ids) for r in first}) > 1


def test_two_steps_in_flight_give_the_tokens_of_one(tiny_models):
    """Greedy runs that stop on stop tokens and max_tokens, at t1 and t2 (every tensor-parallel rank
    fills in the tokens rows await): planning a step ahead changes no output."""
    folder = str(tiny_models["llama-gqa-tied"])
    prompts = random_prompts(10, [3, 40, 17, 90], seed=11)
    sampling = [SamplingParams(max_tokens=6 + i % 5, temperature=0.0, stop_token_ids=[t for t in range(3, 320, 7)])
                for i in range(len(prompts))]
    requests = [{"sampling": s, "prompt_token_ids": p} for s, p in zip(sampling, prompts)]
    for layout in ("t1", "t2"):
        ahead: dict = {}
        one = generate(engine_config(folder, layout=layout, scheduler={"overlap": False}), requests)
        two = generate(engine_config(folder, layout=layout), requests, stats=ahead)
        assert ahead["rows_ahead"] > 0
        assert [(r.token_ids, r.finish_reason) for r in two] == [(r.token_ids, r.finish_reason) for r in one]
        assert {r.finish_reason for r in one} == {"stop", "length"}, layout
