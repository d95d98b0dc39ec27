"""Log-probabilities, penalties, biases and min_tokens on the default model, against transformers:
top-k log-probabilities of greedy runs (chat and completions, and the prompt's for echo) at t1, t2
and p2; greedy outputs under penalties and biases equal a plain reference loop, in static and
seesaw mode (where each request's token counts start over after its KV moves); min_tokens never
ends early."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import default_config, generate, greedy
from seesaw.layout import Layout
from seesaw.sampling import SamplingParams
from seesaw.text import TextCodec
from test_logit_rules import reference

pytestmark = pytest.mark.slow
MAX_TOKENS = 5
TOP = 5
CHATS = ["What is the capital of France?", "Name three colours."]
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"]


@pytest.fixture(scope="module")
def hf_model(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model.weights_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def codec(default_model):
    return TextCodec(default_model.tokenizer_folder)


def hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of `token_ids`: [len, vocab]."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_entry_matches(entry, expected: torch.Tensor, token: int) -> None:
    """One reported position against the reference row: the token's value, and the top values and
    the reference's values at the reported ids (near-ties may order differently)."""
    assert abs(entry.logprob - expected[token].item()) < 1e-3
    top = expected.topk(len(entry.top_ids))
    assert torch.allclose(torch.tensor(entry.top_logprobs), top.values, atol=1e-3)
    assert torch.allclose(expected[entry.top_ids], torch.tensor(entry.top_logprobs), atol=1e-3)


def config_for(run: str):
    prefill, _, decode = run.partition("->")
    config = default_config(prefill, scheduler={"max_num_batched_tokens": 16})  # prompts in several chunks
    if decode:
        config = replace(config, parallel=replace(config.parallel, decode_layout=Layout.parse(decode)))
    return config


@pytest.mark.parametrize("run", ["t1", "t2", "p2"])
def test_top_logprobs_and_echo_equal_transformers(hf_model, codec, run):
    sampling = greedy(MAX_TOKENS, logprobs=TOP)
    echo = greedy(MAX_TOKENS, logprobs=TOP, prompt_logprobs=TOP)
    requests = ([{"sampling": sampling, "messages": [{"role": "user", "content": text}]} for text in CHATS]
                + [{"sampling": sampling, "prompt": text} for text in PROMPTS]
                + [{"sampling": echo, "prompt": text} for text in PROMPTS])
    results = generate(config_for(run), requests)
    prompts = ([codec.encode_chat([{"role": "user", "content": text}]) for text in CHATS]
               + [codec.encode_prompt(text) for text in PROMPTS] * 2)
    for prompt, result in zip(prompts, results):
        assert len(result.logprobs) == len(result.token_ids) == MAX_TOKENS
        expected = hf_logprobs(hf_model, prompt + result.token_ids)
        for offset, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
            assert token == expected[len(prompt) - 1 + offset].argmax().item()  # greedy
            assert_entry_matches(entry, expected[len(prompt) - 1 + offset], token)
    for prompt, result in zip(prompts[-2:], results[-2:]):
        assert result.prompt_token_ids == prompt and result.prompt_logprobs[0] is None
        assert len(result.prompt_logprobs) == len(prompt) > 16  # several chunks of the 16-token budget
        expected = hf_logprobs(hf_model, prompt)
        for position in range(1, len(prompt)):
            assert_entry_matches(result.prompt_logprobs[position], expected[position - 1], prompt[position])
        assert set(result.token_texts) >= {str(token) for token in prompt + result.token_ids}


def reference_greedy(hf_model, prompt: list[int], params: SamplingParams, end_ids: set[int]) -> list[int]:
    """Greedy decoding with the rules applied by `reference`, one full forward per token."""
    output: list[int] = []
    while len(output) < params.max_tokens:
        with torch.inference_mode():
            logits = hf_model(torch.tensor([prompt + output])).logits[0, -1].float().tolist()
        banned = sorted(end_ids) if len(output) < params.min_tokens else []
        adjusted = reference(logits, prompt, output, params, banned)
        output.append(max(range(len(adjusted)), key=adjusted.__getitem__))
        if output[-1] in end_ids and not params.ignore_eos:
            break
    return output


@pytest.mark.parametrize("run", ["t1", "p2->t2"])
def test_greedy_outputs_under_penalties_and_biases_equal_a_reference(hf_model, codec, default_model, run):
    eos = default_model.spec.eos_token_ids[0]
    cases = [
        ("a a a a a a a a", greedy(8, presence_penalty=1.5, frequency_penalty=0.8)),
        ("one two one two one two", greedy(8, repetition_penalty=1.6)),
        ("The weather today is", greedy(8, logit_bias={"28": 100.0, "30": -100.0})),
        ("Count: 1, 2, 3,", greedy(8, frequency_penalty=-1.0, repetition_penalty=0.9, logit_bias={"216": 5.0})),
        ("Hello", SamplingParams(max_tokens=8, temperature=0.0, min_tokens=4, logit_bias={str(eos): 100.0})),
    ]
    config = config_for(run)
    results = generate(config, [{"sampling": params, "prompt": text} for text, params in cases])
    for (text, params), result in zip(cases, results):
        expected = reference_greedy(hf_model, codec.encode_prompt(text), params, {eos})
        assert result.token_ids == expected, text


def test_min_tokens_never_ends_early_on_an_end_or_stop_token(default_model):
    """The end token (or a stop token) biased to be the likeliest: without min_tokens the request
    ends at once, with it the output runs to min_tokens first."""
    eos = default_model.spec.eos_token_ids[0]
    requests = [{"sampling": SamplingParams(max_tokens=12, temperature=temperature, seed=3, min_tokens=min_tokens,
                                            logit_bias={str(ender): 100.0}, stop_token_ids=[ender] if ender != eos else []),
                 "prompt": "Hi"}
                for temperature in (0.0, 1.0) for min_tokens in (0, 6) for ender in (eos, 28)]
    results = generate(default_config("t1"), requests)
    for request, result in zip(requests, results):
        sampling = request["sampling"]
        ender = int(next(iter(sampling.logit_bias)))
        assert result.finish_reason == "stop"
        assert result.token_ids[-1] == ender and len(result.token_ids) == sampling.min_tokens + 1
        assert eos not in result.token_ids[:-1] and ender not in result.token_ids[:-1]
