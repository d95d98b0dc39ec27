"""Constrained requests' grammars, kept beside the scheduler: each one's matcher, advanced by every
token the request samples, and the bitmask of the tokens its next row may sample (the workers mask
the rest before sampling).

The grammar engine is llguidance: JSON schemas, regular expressions, choices and Lark or GBNF
grammars compile in milliseconds whatever their size, a schema keyword it cannot enforce is
refused with its name (rather than ignored, which would let outputs break the schema), and it
needs no other package. A row's mask fills in tens of microseconds.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from seesaw.sampling import Constraint
from seesaw.step import pack_mask

_WHAT = {"json_schema": "the JSON schema", "json_object": "the JSON grammar", "regex": "the regex",
         "choice": "the choices", "grammar": "the grammar"}


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile; the message names the problem."""


def check_constraint(constraint: Constraint) -> None:
    """Compile the constraint's grammar without a tokenizer (cheap; the front door checks each
    body with it): GrammarError names what is wrong."""
    _checked(constraint.kind, constraint.spec)


@lru_cache(maxsize=256)
def _checked(kind: str, spec: str) -> str:
    from llguidance import LLMatcher

    grammar = _grammar(kind, spec)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"{_WHAT[kind]} does not compile: {'; '.join(_first_line(m) for m in messages)}")
    return grammar


def _grammar(kind: str, spec: str) -> str:
    """The engine's grammar definition of a constraint; GrammarError where it cannot be read."""
    import llguidance

    try:
        match kind:
            case "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
            case "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                                     defaults={"whitespace_flexible": False})
            case "regex":
                return llguidance.LLMatcher.grammar_from_regex(spec)
            case "choice":
                return llguidance.grammar_from("choice", spec)
            case "grammar":
                return llguidance.grammar_from("grammar", spec)  # Lark or GBNF
    except ValueError as error:
        raise GrammarError(f"{_WHAT.get(kind, kind)} does not compile: {_first_line(str(error))}") from None
    raise GrammarError(f"unknown constraint kind {kind!r}")


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


class Grammars:
    """The matchers of the constrained requests on this engine, by request id. `compile` runs on
    a worker thread (the engine releases the interpreter's lock); the rest on the scheduler's loop."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._engine_tokenizer = None
        self._lock = threading.Lock()  # the engine's view of the tokenizer is made once, by the first compile
        self._matchers: dict[str, object] = {}
        self._executor = None  # fills a step's masks on threads of its own

    def compile(self, constraint: Constraint):
        """A fresh matcher of the constraint's grammar; GrammarError names what is wrong."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer_now(), _checked(constraint.kind, constraint.spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{_WHAT[constraint.kind]} does not compile: {_first_line(matcher.get_error())}")
        return matcher

    def _tokenizer_now(self):
        import llguidance.hf

        with self._lock:
            if self._engine_tokenizer is None:
                self._engine_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self.vocab_size, eos_token=self._stop_token_ids or None)
            return self._engine_tokenizer

    def start(self, request_id: str, matcher) -> None:
        self._matchers[request_id] = matcher

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def accept(self, request_id: str, token_ids: list[int]) -> bool:
        """Advance the request's matcher by its new tokens; False if one breaks the grammar."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return True
        return all(matcher.consume_token(token) for token in token_ids)

    def masks(self, request_ids: list[str]) -> list[str]:
        """The packed bitmasks of the tokens each request may sample next (filled in parallel)."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=2)
        width = -(-self.vocab_size // 32)
        bitmask = np.zeros((len(request_ids), width), dtype=np.int32)
        matchers = [(self._matchers[request_id], row) for row, request_id in enumerate(request_ids)]
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.ctypes.data, width * 4, len(request_ids))
        return [pack_mask(row) for row in bitmask]

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def clear(self) -> None:
        self._matchers.clear()
