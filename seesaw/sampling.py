"""Per-request generation settings, checked when they are made (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from seesaw.step import FinishReason, RowSampling

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: limits, randomness and stop conditions. The one form of a request's
    sampling from the front door to the scheduler: a value that exists is valid (ValueError naming
    the first invalid field otherwise)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    fit_max_tokens: bool = False  # max_tokens is a default: lower it to what the context leaves, do not refuse

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            if isinstance(self.seed, float) and self.seed.is_integer() and abs(self.seed) >= 2**63:
                raise ValueError(f"seed must be an integer within 64 bits: {self.seed:.0f} lost its last digits "
                                 "as a JSON number past them")
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.fit_max_tokens, bool):
            raise ValueError(f"fit_max_tokens must be true or false, got {self.fit_max_tokens!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def for_row(self, output_index: int) -> RowSampling:
        """What the last stage needs to sample this request's token number `output_index`."""
        return RowSampling(self.temperature, self.top_p, self.top_k, self.seed, output_index)

    def stop_conditions(self, eos_token_ids: frozenset[int] = frozenset(),
                        max_context: int | None = None) -> StopConditions:
        """What ends this request, given the model's end tokens and the context it holds."""
        token_ids = frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else eos_token_ids)
        return StopConditions(token_ids, self.max_tokens, max_context, tuple(self.stop))


@dataclass(frozen=True, slots=True)
class StopConditions:
    """Every condition that ends one request's generation, decided here: a stop token (its own, or
    the model's end tokens unless it ignores them), its length (max_tokens or the model's context)
    and a stop string. The scheduler applies the token conditions as tokens are sampled, the
    RequestQueue the stop strings as they become text."""

    token_ids: frozenset[int]
    max_tokens: int
    max_context: int | None  # prompt and output tokens the model holds; None: no limit
    strings: tuple[str, ...] = ()

    def after_token(self, token: int, num_output: int, num_tokens: int) -> FinishReason | None:
        """Why the request ends with `token` (its output now `num_output` tokens, prompt and output
        `num_tokens`), or None while it goes on."""
        if token in self.token_ids:
            return FinishReason.STOP
        if num_output >= self.max_tokens or (self.max_context is not None and num_tokens >= self.max_context):
            return FinishReason.LENGTH
        return None

    def first_string(self, text: str, start: int = 0) -> int | None:
        """Where the first stop string found in `text` from `start` on begins, or None."""
        found = [index for index in (text.find(string, start) for string in self.strings) if index >= 0]
        return min(found) if found else None

    @property
    def held_chars(self) -> int:
        """How much of a streamed text's end to hold back while it may still be a stop string's start."""
        return max((len(string) for string in self.strings), default=1) - 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
