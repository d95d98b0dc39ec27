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
    """Allocates host-buffer blocks per request; one slot per request at a time."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self._pool = BlockPool(num_blocks, "host KV buffer")
        self._slots: dict[str, HostSlot] = {}

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    def can_store(self, num_tokens: int) -> bool:
        return self._pool.can_allocate(blocks_for(num_tokens, self.block_size))

    def store(self, request_id: str, num_tokens: int) -> HostSlot:
        if request_id in self._slots:
            raise ValueError(f"request {request_id} already has a host slot")
        slot = HostSlot(request_id, self._pool.allocate(blocks_for(num_tokens, self.block_size)), num_tokens)
        self._slots[request_id] = slot
        return slot

    def get(self, request_id: str) -> HostSlot | None:
        return self._slots.get(request_id)

    def release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._pool.free(slot.host_block_ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._slots
