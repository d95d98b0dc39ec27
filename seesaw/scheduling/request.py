"""A request as the scheduler sees it: tokens, progress through them, and the KV it holds (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from seesaw.sampling import SamplingParams, StopConditions
from seesaw.scheduling.decisions import Phase


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request as the cores take it: tokenized, its max_tokens fitted to the context."""

    request_id: str
    prompt_token_ids: list[int]  # read only: requests may share one list
    sampling: SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"  # no KV anywhere; prefill (or recompute) pending
    RUNNING = "running"  # KV on the device, schedulable
    EVICTING = "evicting"  # KV being copied to the host buffer; device blocks still held
    SWAPPED = "swapped"  # KV only in the host buffer
    RESTORING = "restoring"  # KV being copied back into freshly allocated device blocks
    PAUSED = "paused"  # seesaw: KV on the device in the decode layout while the replica prefills
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class RequestState:
    """One request's progress (equal only to itself: the cores find it in their lists by identity)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopConditions
    arrival: int  # the order requests came in
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_in_flight: int = 0  # steps in flight that include this request
    num_awaited: int = 0  # tokens that steps in flight sample for it, not known yet
    last_step_id: int | None = None  # the latest step with a row of it
    num_blocks_sent: int = 0  # of block_ids, how many the workers already hold (0: none, or stale)
    is_stopped: bool = False  # finished by the user while busy; released once idle
    kv_phase: Phase = Phase.MIXED  # the phase whose layout its device blocks are laid out in
    arrival_s: float = 0.0  # when it came in, by the core's clock
    block_keys: list[int] = field(default_factory=list)  # prefix cache keys of its first full blocks
    num_named: int = 0  # of block_ids, how many leading ones were named or found in the prefix cache
    has_counts: bool = False  # the sampling workers count its tokens (for penalties) since its table started

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is still to be computed."""
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt followed by output."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]
