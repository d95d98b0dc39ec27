"""Penalties, biases, banned tokens and grammar masks as the sampling workers apply them, against a
plain reference on fixed logits; the token counts the workers keep across steps; log-probabilities."""

from __future__ import annotations

import random

import numpy as np
import torch

from seesaw.model.logits import adjusted_logits, token_logprobs, unpack_masks
from seesaw.model.sampler import Sampler
from seesaw.runtime.token_counts import TokenCounts
from seesaw.sampling import SamplingParams
from seesaw.step import StepRow, pack_mask

VOCAB = 40
CPU = torch.device("cpu")


def reference(logits: list[float], prompt: list[int], output: list[int], params: SamplingParams,
              banned: list[int] = (), allowed: set[int] | None = None) -> list[float]:
    """Each rule applied token by token, as written in the OpenAI and Hugging Face descriptions."""
    out = list(logits)
    for token in range(len(out)):
        if token in prompt or token in output:
            rep = params.repetition_penalty
            out[token] = out[token] / rep if out[token] > 0 else out[token] * rep
        count = output.count(token)
        out[token] -= count * params.frequency_penalty + (count > 0) * params.presence_penalty
    for key, value in params.logit_bias.items():
        out[int(key)] += value
    for token in banned:
        out[token] = float("-inf")
    if allowed is not None:
        out = [value if token in allowed else float("-inf") for token, value in enumerate(out)]
    return out


def test_adjusted_logits_equal_the_reference_for_every_rule_at_once():
    rng = random.Random(3)
    sampler = Sampler(CPU)
    counts = TokenCounts(CPU, VOCAB)
    cases = []
    for index in range(6):
        params = SamplingParams(presence_penalty=rng.choice([0.0, 0.7, -1.2]), frequency_penalty=rng.choice([0.0, 0.5]),
                                repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
                                logit_bias={str(rng.randrange(VOCAB)): rng.uniform(-100, 100) for _ in range(3)},
                                min_tokens=2, max_tokens=8)
        prompt = [rng.randrange(VOCAB) for _ in range(7)]
        output = [rng.randrange(VOCAB) for _ in range(rng.randrange(4))]
        cases.append((f"r{index}", params, prompt, output))
    rows, samplings = [], []
    for request_id, params, prompt, output in cases:
        sampling = params.for_row(len(output), frozenset({1, 2}))
        if sampling.adjustments is not None and sampling.adjustments.counts_tokens:
            sampling.adjustments.history_prompt, sampling.adjustments.history_output = prompt, output
        rows.append(StepRow(request_id, [prompt[-1]], len(prompt) - 1, [], 0, sampling))
        samplings.append(sampling)
    allowed = {3, 5, 8, 13, 21}
    samplings[2].allowed = pack_mask(np.array([sum(1 << t for t in allowed)] + [0], dtype=np.int32))
    counts.take(rows)
    counted = [row.request_id for row in rows if row.sampling.adjustments and row.sampling.adjustments.counts_tokens]
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(5)) * 4
    out = adjusted_logits(logits, samplings, counts.history(counted) if counted else None, sampler.upload)
    for index, (_, params, prompt, output) in enumerate(cases):
        banned = [1, 2] if len(output) < params.min_tokens else []
        expected = reference(logits[index].tolist(), prompt, output, params, banned, allowed if index == 2 else None)
        np.testing.assert_allclose(out[index].numpy(), np.array(expected, dtype=np.float32), rtol=1e-5, atol=1e-4)
    assert torch.equal(logits, logits.clone())  # the model's own logits are left for the log-probabilities


def test_token_counts_follow_the_tokens_sampled_and_start_over_with_the_table():
    """Counts start from the row that brings the history, grow by each sampled token without the
    host, and are dropped when the request's table starts over or it is released."""
    counts = TokenCounts(CPU, VOCAB)
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0)
    first = params.for_row(0)
    first.adjustments.history_prompt, first.adjustments.history_output = [4, 4, 9], []
    counts.take([StepRow("a", [4, 4, 9], 0, [0], 0, first)])
    counts.add(["a"], torch.tensor([7]))
    counts.take([StepRow("a", [], 3, [], 1, params.for_row(1), awaits_token=True)])
    counts.add(["a"], torch.tensor([7]))
    history = counts.history(["a"])
    assert history.seen[0].nonzero().flatten().tolist() == [4, 7, 9]
    assert history.counts[0, 7].item() == 2.0 and history.counts[0, 4].item() == 0.0  # prompt tokens are not output
    counts.take([StepRow("a", [4, 4, 9, 7, 7], 0, [3], 0, None)])  # a recompute: the table starts over
    assert "a" not in counts.slots
    counts.take([StepRow("b", [1], 0, [0], 0, first)])
    counts.forget(["b"])
    assert not counts.slots


def test_token_counts_grow_past_their_first_capacity():
    counts = TokenCounts(CPU, VOCAB)
    params = SamplingParams(presence_penalty=1.0)
    for index in range(20):
        sampling = params.for_row(0)
        sampling.adjustments.history_prompt, sampling.adjustments.history_output = [index], [index + 1]
        counts.take([StepRow(f"r{index}", [index], 0, [0], 0, sampling)])
    history = counts.history([f"r{index}" for index in range(20)])
    assert all(history.counts[index].nonzero().flatten().tolist() == [index + 1] for index in range(20))


def test_a_penalised_row_without_its_history_is_an_error_naming_it():
    counts = TokenCounts(CPU, VOCAB)
    try:
        counts.history(["lost"])
    except ValueError as error:
        assert "request lost" in str(error)
    else:
        raise AssertionError("no error")


def test_masks_round_trip_through_their_packed_form():
    rng = random.Random(1)
    vocab = 100
    allowed = [sorted(rng.sample(range(vocab), 9)) for _ in range(3)]
    words = [np.zeros(-(-vocab // 32), dtype=np.uint32) for _ in allowed]
    for row, tokens in zip(words, allowed):
        for token in tokens:
            row[token // 32] |= np.uint32(1 << (token % 32))
    unpacked = unpack_masks([pack_mask(row.view(np.int32)) for row in words], vocab, Sampler(CPU).upload)
    assert [row.nonzero().flatten().tolist() for row in unpacked] == allowed


def test_log_probabilities_are_the_models_own_and_cut_to_each_rows_top():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([4, 0, 39])
    chosen, values, ids = token_logprobs(logits, tokens, 5)
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(chosen.double(), expected[torch.arange(3), tokens], atol=1e-6)
    assert torch.equal(ids, expected.topk(5, dim=-1).indices)
    assert torch.allclose(values.double(), expected.topk(5, dim=-1).values, atol=1e-6)
