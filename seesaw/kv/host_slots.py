"""Host slots: which host-buffer blocks hold which request's KV (pure).

A slot's first blocks may be shared: full blocks of a prefix that another request's save wrote
and named (the device pool's keys name them here too), so each shared prefix is saved to the host
buffer once and counted once for every slot holding it."""

from __future__ import annotations

from dataclasses import dataclass

from seesaw.kv.block_pool import ROOT_KEY, BlockPool, BlockTokens, blocks_for


@dataclass(frozen=True)
class HostSlot:
    """A request's region of the host buffer."""

    request_id: str
    host_block_ids: list[int]
    num_tokens: int
    shared_holders: tuple[str, ...] = ()  # for its first blocks, shared: the requests whose saves wrote them

    @property
    def num_shared(self) -> int:
        return len(self.shared_holders)


class HostSlots:
    """Allocates host-buffer blocks per request, one slot per request at a time; a replica owns
    the blocks `first_block` to `first_block + num_blocks - 1` of the node's buffer."""

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0):
        self.block_size = block_size
        self.first_block = first_block
        self._pool = BlockPool(num_blocks, "host KV buffer")
        self._slots: dict[str, HostSlot] = {}
        self._writers: dict[int, str] = {}  # named block -> the request whose save wrote it
        self._saving: dict[str, list[int]] = {}  # by request: the blocks its save in flight names
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

    def match(self, chain) -> tuple[list[int], bool]:
        """The saved blocks holding the longest start of `chain` (keys and tokens of full blocks,
        in order, as the device pool takes them), which a slot may share, and whether a save in
        flight is writing the block after them."""
        return self._pool.match(chain)

    def can_store(self, num_tokens: int, shared: list[int] = ()) -> bool:
        """Whether a slot of `num_tokens` tokens whose first blocks are the `shared` ones fits."""
        needed = blocks_for(num_tokens, self.block_size) - len(shared) + self._pool.num_idle(shared)
        return self._pool.can_allocate(needed)

    def store(self, request_id: str, num_tokens: int, shared: list[int] = ()) -> HostSlot:
        """Reserve a slot; its first blocks are the `shared` ones (from `match`), the rest new."""
        if request_id in self._slots:
            raise ValueError(f"request {request_id} already has a host slot")
        self._pool.hold(list(shared))
        blocks = list(shared) + self._pool.allocate(blocks_for(num_tokens, self.block_size) - len(shared))
        self.peak_used = max(self.peak_used, self._pool.num_used)
        slot = HostSlot(request_id, [self.first_block + block for block in blocks], num_tokens,
                        tuple(self._writers[block] for block in shared))
        self._slots[request_id] = slot
        return slot

    def name_saving(self, request_id: str, chain: list[tuple[int, BlockTokens]]) -> None:
        """Name the slot's blocks past the shared ones, as far as `chain` (their keys and tokens,
        from the slot's first block on) goes; they may be shared once its save lands
        (`cache_saved`)."""
        slot = self._slots[request_id]
        pool, first = self._pool, self.first_block
        named = []
        for index in range(slot.num_shared, min(len(chain), len(slot.host_block_ids))):
            block = slot.host_block_ids[index] - first
            key, tokens = chain[index]
            if pool.name(block, key, chain[index - 1][0] if index else ROOT_KEY, tokens):
                self._writers[block] = request_id
                named.append(block)
        if named:
            self._saving[request_id] = named

    def cache_saved(self, request_id: str) -> None:
        """The request's save landed: the blocks it named hold their KV and may be shared."""
        self._pool.cache(self._saving.pop(request_id, ()))

    def get(self, request_id: str) -> HostSlot | None:
        return self._slots.get(request_id)

    def release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        self._saving.pop(request_id, None)
        if slot is not None:
            self._pool.free([block - self.first_block for block in slot.host_block_ids])

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._slots


def split_host_blocks(num_blocks: int, num_replicas: int) -> list[tuple[int, int]]:
    """Each data-parallel replica's part of the node's host buffer, as (first block, count)."""
    share = num_blocks // num_replicas
    return [(replica * share, share) for replica in range(num_replicas)]
