"""Prefix caching on the default model: greedy outputs are the same with and without it, in static
layouts and in seesaw mode, for prompts that share a system prompt and few-shot blocks, prompts
that are exact prefixes of others, one that ends on a block boundary and one a token past it."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from helpers import default_config, generate, greedy
from seesaw.layout import Layout

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)

    def tokens(count):
        return [rng.randrange(100, 40_000) for _ in range(count)]

    system, shots = tokens(40), tokens(32)  # 2.5 blocks, then 2 blocks more
    long = system + shots + tokens(11)
    return [
        system + tokens(10),
        system + tokens(9),
        long,
        system + shots + tokens(5),
        long[:48],  # ends on a block boundary, a prefix of `long`
        long[:49],  # a token past it
        system + tokens(10),
        long,  # exactly another prompt
    ]


@pytest.fixture(scope="module")
def uncached(default_model, prompts):
    config = default_config("t1", scheduler={"prefix_caching": False, "max_num_batched_tokens": 64})
    return [result.token_ids for result in generate(config, _requests(prompts))]


def _requests(prompts):
    return [{"sampling": greedy(MAX_TOKENS), "prompt_token_ids": prompt} for prompt in prompts]


@pytest.mark.parametrize("run", ["t1", "t2", "p2", "p2->t2"])
def test_greedy_outputs_are_the_same_with_prefix_caching(default_model, prompts, uncached, run):
    prefill, _, decode = run.partition("->")
    config = default_config(prefill, scheduler={"max_num_batched_tokens": 64})
    if decode:
        config = replace(config, parallel=replace(config.parallel, decode_layout=Layout.parse(decode)))
    counters: dict = {}
    # Submitted together: a request whose prefix another is computing waits for that step, then
    # shares its blocks.
    results = generate(config, _requests(prompts), stats=counters)
    assert [r.token_ids for r in results] == uncached
    assert counters["cached_tokens"] >= 32 * 6  # every prompt after the first shares the system prompt's full blocks
    if decode:
        assert counters["transitions"] >= 1
