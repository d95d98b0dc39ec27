"""Allocation of KV blocks: the device pool of a layout and the host buffer share this core (pure)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """A fixed set of block ids handed out and returned; query before command."""

    def __init__(self, num_blocks: int, what: str = "device KV pool"):
        if num_blocks < 0:
            raise ValueError(f"{what} cannot have {num_blocks} blocks")
        self.num_blocks = num_blocks
        self.what = what
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"{self.what}: asked for {count} blocks, {len(self._free)} free")
        take = self._free.popleft
        return [take() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)
