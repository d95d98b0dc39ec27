"""The OpenAI `n` field: a request asking for n choices runs as n engine requests, one per choice,
each sampled with its own seed, and their answers are gathered into one (pure: no engine, no I/O)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace

from seesaw.messages import RequestFinished
from seesaw.sampling import SamplingParams

MAX_N = 128  # the most choices one request may ask for


def check_n(value) -> int:
    """How many choices a body asks for (1 when it leaves `n` out); ValueError names a bad `n`."""
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_N:
        raise ValueError(f"n must be an integer from 1 to {MAX_N}, got {value!r}")
    return value


def mixed_seed(seed: int, key: str) -> int:
    """A 63-bit seed mixed from `seed` and `key` (the first 8 bytes of their blake2b hash): the
    same on every machine and in every run, and unrelated for different keys."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request sampled with `seed`: choice 0 keeps it and choice
    i > 0 takes `mixed_seed(seed, "choice i")`, so each choice draws noise of its own and is the
    same in every run and layout. An unseeded request's choices stay unseeded: each draws from
    the workers' generator, as any unseeded request does."""
    if seed is None or index == 0:
        return seed
    return mixed_seed(seed, f"choice {index}")


def choice_samplings(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling of each of a request's `n` choices, in choice order."""
    return [replace(sampling, seed=choice_seed(sampling.seed, index)) if index and sampling.seed is not None
            else sampling for index in range(n)]


class Choices:
    """The engine requests that answer one front-door request (choice i under `request_ids[i]`),
    gathered: the request is decided once, by its last choice's result, or by the first choice
    that fails (the others are then for the front door to cancel)."""

    def __init__(self, request_ids: Iterable[str]):
        self.request_ids = list(request_ids)
        self._indices = {request_id: index for index, request_id in enumerate(self.request_ids)}
        self._results: list[RequestFinished | None] = [None] * len(self.request_ids)
        self._num_finished = 0
        self.failure: RequestFinished | None = None  # the first choice's error, once one failed
        self.is_decided = False

    def index(self, request_id: str) -> int:
        """The choice a request id answers."""
        return self._indices[request_id]

    def take(self, result: RequestFinished) -> bool:
        """Record one choice's result; whether it decides the request now (the last result came
        in, or the first error did). Results after that change nothing."""
        index = self._indices[result.request_id]
        if self._results[index] is not None:
            return False
        self._results[index] = result
        self._num_finished += 1
        if self.is_decided:
            return False
        if result.error is not None:
            self.failure = result
        self.is_decided = self.failure is not None or self._num_finished == len(self._results)
        return self.is_decided

    @property
    def answer(self) -> list[RequestFinished]:
        """Once decided: every choice's result in choice order, or the one result that failed."""
        if not self.is_decided:
            raise ValueError(f"{self.request_ids[0]} is not decided yet: "
                             f"{self._num_finished} of {len(self._results)} choices are in")
        return [self.failure] if self.failure is not None else list(self._results)

    @property
    def unfinished_ids(self) -> list[str]:
        """The request ids of choices still running."""
        return [request_id for request_id, result in zip(self.request_ids, self._results) if result is None]

    @property
    def is_done(self) -> bool:
        """Whether every choice has its result (a failed request's others included)."""
        return self._num_finished == len(self._results)
