"""Host slots: which host-buffer blocks hold which request's KV (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from seesaw.kv.block_pool import BlockPool, blocks_for


@dataclass(frozen=True)
class HostSlot:
    """A request's region of the host buffer."""

    request_id: str
    host_block_ids: list[int]
    num_tokens: int


class HostSlots:
    """Allocates host-buffer blocks per request, one slot per request at a time; a replica owns
    the blocks `first_block` to `first_block + num_blocks - 1` of the node's buffer."""

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0):
        self.block_size = block_size
        self.first_block = first_block
        self._pool = BlockPool(num_blocks, "host KV buffer")
        self._slots: dict[str, HostSlot] = {}
        self.peak_used = 0  # the most blocks held at once so far

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    @property
    def num_used(self) -> int:
        return self._pool.num_used

    @property
    def used_fraction(self) -> float:
        return self._pool.num_used / self._pool.num_blocks if self._pool.num_blocks else 0.0

    @property
    def peak_fraction(self) -> float:
        """The fullest the buffer has been so far."""
        return self.peak_used / self._pool.num_blocks if self._pool.num_blocks else 0.0

    def can_store(self, num_tokens: int) -> bool:
        return self._pool.can_allocate(blocks_for(num_tokens, self.block_size))

    def store(self, request_id: str, num_tokens: int) -> HostSlot:
        if request_id in self._slots:
            raise ValueError(f"request {request_id} already has a host slot")
        blocks = self._pool.allocate(blocks_for(num_tokens, self.block_size))
        self.peak_used = max(self.peak_used, self._pool.num_used)
        slot = HostSlot(request_id, [self.first_block + block for block in blocks], num_tokens)
        self._slots[request_id] = slot
        return slot

    def get(self, request_id: str) -> HostSlot | None:
        return self._slots.get(request_id)

    def release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._pool.free([block - self.first_block for block in slot.host_block_ids])

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._slots


def split_host_blocks(num_blocks: int, num_replicas: int) -> list[tuple[int, int]]:
    """Each data-parallel replica's part of the node's host buffer, as (first block, count)."""
    share = num_blocks // num_replicas
    return [(replica * share, share) for replica in range(num_replicas)]
