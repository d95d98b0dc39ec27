"""The order in which a batch submits the lines it has read ahead: lines whose prompts share a
prefix go one after another, so the engine's prefix cache still holds the blocks they share, and
no line waits past a fixed bound (pure: no engine, no I/O)."""

from __future__ import annotations

import bisect
from typing import Generic, TypeVar

from seesaw.frontend.batch_io import BatchItem

Value = TypeVar("Value")


def prompt_key(item: BatchItem) -> tuple:
    """What a line's prompt sorts by: prompts that share a prefix sort next to each other. Token
    ids, text and chats sort apart (a text and a token-id prompt are not compared)."""
    if item.prompt_token_ids is not None:
        return (0, tuple(item.prompt_token_ids))
    if item.prompt is not None:
        return (1, item.prompt)
    return (2, tuple((message["role"], message["content"]) for message in item.messages))


class PrefixOrder(Generic[Value]):
    """Holds up to `window` lines and hands them out in sweeps through their keys' sorted order,
    as an elevator serves floors: after a line, the held line with the next key (at or past it),
    and from the smallest key again once none is left past it. So lines sharing a prefix go out
    together, and a line read later joins the sweep where its key falls.

    The bound: a line goes next once `max_passed` lines read after it have gone before it (by
    default `window`); the sweep then goes on from its key. `window` 1 hands lines out in the
    order they came."""

    def __init__(self, window: int, max_passed: int | None = None):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.max_passed = window if max_passed is None else max_passed
        if self.max_passed < 0:
            raise ValueError(f"max_passed must not be negative, got {self.max_passed}")
        self._sorted: list[tuple[tuple, int]] = []  # (key, arrival number) of every line held, in key order
        self._held: dict[int, tuple[tuple, Value]] = {}  # arrival number -> (key, line), oldest first
        self._num_added = 0
        self._num_taken = 0
        self._cursor: tuple[tuple, int] | None = None  # (key, arrival number) of the line taken last

    def __len__(self) -> int:
        return len(self._held)

    @property
    def is_full(self) -> bool:
        return len(self._held) >= self.window

    def add(self, key: tuple, value: Value) -> None:
        """Hold one line, read after every line added before it."""
        if self.is_full:
            raise ValueError(f"the window holds {self.window} lines already: take one first")
        number = self._num_added
        self._num_added += 1
        self._held[number] = (key, value)
        bisect.insort(self._sorted, (key, number))

    def take(self) -> Value:
        """The line to submit next."""
        if not self._held:
            raise ValueError("no line is held")
        oldest = next(iter(self._held))
        # Every line read before the oldest one has been taken, so the lines taken since it came
        # that were read after it number `_num_taken - oldest`.
        if self._num_taken - oldest >= self.max_passed:
            index = bisect.bisect_left(self._sorted, (self._held[oldest][0], oldest))
        elif self._cursor is None:
            index = 0
        else:
            index = bisect.bisect_left(self._sorted, self._cursor)
            if index == len(self._sorted):
                index = 0  # nothing past the last key taken: a new sweep from the smallest
        self._cursor = self._sorted.pop(index)
        self._num_taken += 1
        return self._held.pop(self._cursor[1])[1]
