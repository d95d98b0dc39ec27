"""Allocation of KV blocks: the device pool of a layout and the host buffer share this core (pure)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """A fixed set of block ids handed out and returned; query before command.

    Ids never handed out yet are kept as a count, not a list, so a pool of many millions of small
    blocks costs nothing until they are used: they go out in order, before any returned id, and
    returned ids go out in the order they came back."""

    def __init__(self, num_blocks: int, what: str = "device KV pool"):
        if num_blocks < 0:
            raise ValueError(f"{what} cannot have {num_blocks} blocks")
        self.num_blocks = num_blocks
        self.what = what
        self._next_fresh = 0  # ids from here to num_blocks - 1 were never handed out
        self._returned: deque[int] = deque()

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._next_fresh + len(self._returned)

    @property
    def num_used(self) -> int:
        return self._next_fresh - len(self._returned)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise ValueError(f"{self.what}: asked for {count} blocks, {self.num_free} free")
        start = self._next_fresh
        self._next_fresh = min(self.num_blocks, start + count)
        blocks = list(range(start, self._next_fresh))
        if len(blocks) < count:
            take = self._returned.popleft
            blocks += [take() for _ in range(count - len(blocks))]
        return blocks

    def free(self, block_ids: list[int]) -> None:
        self._returned.extend(block_ids)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)
