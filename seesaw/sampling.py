"""Per-request generation settings, checked when they are made (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from seesaw.step import Adjustments, FinishReason, RowSampling

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What a constrained request's output must match: a JSON schema (its JSON text), any JSON
    object, a regular expression, one of a list of strings (their JSON list) or a grammar (Lark or
    GBNF text); the scheduler's grammar engine compiles it and masks each row's tokens."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"a constraint's kind is one of {', '.join(CONSTRAINT_KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"a constraint's spec must be a string, got {type(self.spec).__name__}")


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
    logprobs: int | None = None  # each output token's log-probability, with this many top alternatives
    prompt_logprobs: int | None = None  # each prompt token's log-probability (but the first's), likewise
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] = field(default_factory=dict)  # token id (as JSON keys are: text) -> bias
    min_tokens: int = 0  # end tokens cannot be sampled before this many output tokens
    constraint: Constraint | None = None

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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_integer(value) or not 0 <= value <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name} must be an integer from 0 to {MAX_TOP_LOGPROBS} (top alternatives per "
                                 f"token), got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be a number in (0, 10] (1: none), got {self.repetition_penalty!r}")
        self._check_logit_bias()
        if not _is_integer(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError("constraint must be a Constraint")

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {bias!r}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
        for key, value in bias.items():
            if not isinstance(key, str) or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
            if not _is_number(value) or not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias[{key}] must be a number in [-100, 100], got {value!r}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError naming the first token id this request's settings name outside the model's vocabulary."""
        for key in self.logit_bias:
            if int(key) >= vocab_size:
                raise ValueError(f"logit_bias names token {key}, outside the model's vocabulary (0 to {vocab_size - 1})")
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise ValueError(f"stop_token_ids names token {token}, outside the model's vocabulary "
                                 f"(0 to {vocab_size - 1})")

    @property
    def is_constrained(self) -> bool:
        return self.constraint is not None

    @property
    def adjusts_logits(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def for_row(self, output_index: int, end_ids: frozenset[int] = frozenset()) -> RowSampling:
        """What the last stage needs to sample this request's token number `output_index`; `end_ids`:
        the tokens that would end it, kept from being sampled before min_tokens (a constrained
        request's grammar decides where it may end instead)."""
        adjustments = None
        if self.adjusts_logits:
            bias = sorted((int(key), float(value)) for key, value in self.logit_bias.items())
            adjustments = Adjustments(self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                                      [token for token, _ in bias], [value for _, value in bias])
        banned = None
        if output_index < self.min_tokens and end_ids and self.constraint is None:
            banned = sorted(end_ids)
        return RowSampling(self.temperature, self.top_p, self.top_k, self.seed, output_index, self.logprobs,
                           adjustments, banned)

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


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
