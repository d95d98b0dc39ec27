"""Greedy outputs equal Hugging Face transformers' greedy outputs token for token."""

from __future__ import annotations

import pytest

from helpers import TINY_MODELS, engine_config, generate, greedy, hf_greedy, random_prompts

MAX_TOKENS = 12


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_greedy_matches_transformers(tiny_models, name):
    folder = tiny_models[name]
    prompts = random_prompts(5, [1, 7, 33, 64, 100], seed=len(name))
    # A 32-token budget splits the longer prompts into several prefill chunks.
    config = engine_config(str(folder), scheduler={"max_num_batched_tokens": 32})
    results = generate(config, [{"sampling": greedy(MAX_TOKENS), "prompt_token_ids": p} for p in prompts])
    assert [r.error for r in results] == [None] * len(prompts)
    assert [r.token_ids for r in results] == hf_greedy(folder, prompts, MAX_TOKENS)
