"""What one step asks of each request and what it gives back: shared by the scheduler that plans
the step, the messages that carry it and the model that runs it (pure, no torch)."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a request stopped generating (the OpenAI `finish_reason`)."""

    STOP = "stop"  # an end-of-sequence token, a stop token or a stop string
    LENGTH = "length"  # max_tokens, or the model's context
    CANCELLED = "cancelled"  # its client cancelled it


@dataclass(slots=True)
class Adjustments:
    """How one row's logits change before it samples: penalties on the tokens its request holds
    already, and fixed biases. The sampling workers count each request's tokens on the device; a
    row carries the request's tokens (`history_prompt`, `history_output`) only where they may not
    hold that count: the first row that samples after its block table started over."""

    presence: float = 0.0  # subtracted from each token its output holds
    frequency: float = 0.0  # subtracted once per time its output holds a token
    repetition: float = 1.0  # divides positive (multiplies negative) logits of tokens its prompt or output holds
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    history_prompt: list[int] | None = None
    history_output: list[int] | None = None

    @property
    def counts_tokens(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0


@dataclass(slots=True)
class RowSampling:
    """How the last stage samples one row's next token."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    output_index: int = 0  # how many tokens the request has generated so far
    logprobs: int | None = None  # report the sampled token's log-probability and this many top alternatives
    adjustments: Adjustments | None = None
    banned_ids: list[int] | None = None  # tokens it may not sample now (its end tokens, before min_tokens)
    allowed: str | None = None  # a constrained row's allowed tokens: base64 of an int32 bitmask (bit t % 32 of word t // 32)


@dataclass(slots=True)
class TokenLogprobs:
    """One position's log-probabilities under the model's own distribution (before temperature,
    penalties and masks): the token's there, and the `top` most likely tokens' (ids and values)."""

    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens `first_position`, `first_position + 1`, ... of one request,
    each given the tokens before it (one prefill chunk's worth)."""

    request_id: str
    first_position: int
    entries: list[TokenLogprobs]


@dataclass(slots=True)
class StepRow:
    """One request's part of a step: its new tokens at positions start, start + 1, ...

    A row carries only the blocks the workers have not seen yet: they keep each request's block
    table and put `new_block_ids` at `first_new_block` in it (0: the table starts over, as on a
    request's first step and after its KV moved). A row that `awaits_token` was planned while the
    step before it, which samples this request's next token, was still running: that token, which
    only the workers have yet, is the row's first, and `token_ids` follow it.
    """

    request_id: str
    token_ids: list[int]
    start: int
    new_block_ids: list[int]
    first_new_block: int = 0
    sampling: RowSampling | None = None  # None: a prefill chunk that does not reach the end
    awaits_token: bool = False
    score_prompt: int | None = None  # report each next prompt token's log-probability and this many alternatives
    next_prompt_token: int | None = None  # with score_prompt: the prompt token after this chunk, if any

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + self.awaits_token


@dataclass(slots=True)
class TokenUpdate:
    """New tokens of one request, and why it finished if it did."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token, where the request asked for them
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(slots=True)
class StepShape:
    """What one step asks of the model, summed over its rows."""

    num_tokens: int  # new tokens (prompt chunks and decode tokens)
    num_rows: int
    num_sampled: int  # rows whose last token is sampled
    context_tokens: int  # tokens each row attends to, summed (KV read once per row)
    attention_pairs: int  # query-key pairs, summed (causal within a chunk)
    num_decode_rows: int = 0  # rows of one new token past the prompt's start


def step_shape(rows: Iterable[StepRow]) -> StepShape:
    """The shape of a step from its rows."""
    num_rows = num_tokens = context = pairs = sampled = decode = 0
    for row in rows:
        start, new = row.start, len(row.token_ids) + row.awaits_token
        num_rows += 1
        num_tokens += new
        context += start + new
        sampled += row.sampling is not None
        if new == 1:
            pairs += start + 1
            decode += start > 0
        else:
            pairs += new * start + new * (new + 1) // 2
    return StepShape(num_tokens, num_rows, sampled, context, pairs, decode)


def pack_mask(words) -> str:
    """A bitmask of int32 words (bit t % 32 of word t // 32 allows token t) as a row carries it."""
    return base64.b64encode(memoryview(words).cast("B")).decode("ascii")
