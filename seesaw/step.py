"""What one step asks of each request and what it gives back: shared by the scheduler that plans
the step, the messages that carry it and the model that runs it (pure, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a request stopped generating (the OpenAI `finish_reason`)."""

    STOP = "stop"  # an end-of-sequence token, a stop token or a stop string
    LENGTH = "length"  # max_tokens, or the model's context
    CANCELLED = "cancelled"  # its client cancelled it


@dataclass(frozen=True)
class RowSampling:
    """How the last stage samples one row's next token."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    output_index: int = 0  # how many tokens the request has generated so far


@dataclass(frozen=True)
class StepRow:
    """One request's part of a step: `token_ids` at positions start, start + 1, ..."""

    request_id: str
    token_ids: list[int]
    start: int
    block_ids: list[int]
    sampling: RowSampling | None = None  # None: a prefill chunk that does not reach the end


@dataclass(frozen=True)
class TokenUpdate:
    """New tokens of one request, and why it finished if it did."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
