"""Allocation of KV blocks: the device pool of a layout and the host buffer share this core (pure).

A device pool also caches prefixes. A full block is named by the chain of the tokens before and in
it: its key is a hash of the previous block's key and its own tokens, and the entry keeps both, so
a lookup compares tokens, never trusts a hash alone. A named block is first being written (the step
that computes it is still running), then cached. Blocks are reference-counted: every request whose
block table holds a block holds it once. A cached block nobody holds stays in the pool, findable,
until an allocation needs room (the least recently released first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

BlockTokens = tuple[int, ...]


@dataclass(slots=True)
class _Name:
    """What a named block holds: its key, its predecessor's key and its tokens."""

    key: int
    parent: int
    tokens: BlockTokens
    layout: object = None  # what lays its bytes out (a device pool's blocks differ by layout)
    is_cached: bool = False  # False: the step writing it is still running


ROOT_KEY = 0  # the key before a prompt's first block


def chain_key(parent: int, tokens: BlockTokens) -> int:
    """The key of a full block of `tokens` after the block keyed `parent`."""
    return hash((parent, tokens))


class BlockPool:
    """A fixed set of block ids handed out and returned; query before command.

    Ids never handed out yet are kept as a count, not a list, so a pool of many millions of small
    blocks costs nothing until they are used: they go out in order, before any returned id, and
    returned ids go out in the order they came back, then cached blocks nobody holds, the least
    recently released first (they lose their name)."""

    def __init__(self, num_blocks: int, what: str = "device KV pool"):
        if num_blocks < 0:
            raise ValueError(f"{what} cannot have {num_blocks} blocks")
        self.num_blocks = num_blocks
        self.what = what
        self._next_fresh = 0  # ids from here to num_blocks - 1 were never handed out
        self._returned: deque[int] = deque()
        self._holders: dict[int, int] = {}  # held blocks: how many block tables hold each
        self._names: dict[int, _Name] = {}  # block id -> its name
        self._by_key: dict[tuple[object, int], int] = {}  # (layout, key) -> the block named by it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    # ------------------------------------------------------------ queries

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used, returned, or cached and held by nobody."""
        return self.num_blocks - self._next_fresh + len(self._returned) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks some request holds."""
        return len(self._holders)

    @property
    def num_cached(self) -> int:
        """Named blocks, held or not."""
        return len(self._names)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def holders(self, block_id: int) -> int:
        return self._holders.get(block_id, 0)

    def is_idle(self, block_id: int) -> bool:
        """Cached, and held by nobody: holding it takes one block from the free ones."""
        return block_id in self._idle

    def num_idle(self, block_ids: list[int]) -> int:
        """Of these blocks, the cached ones nobody holds: holding them takes them from the free ones."""
        idle = self._idle
        return sum(1 for block in block_ids if block in idle)

    def match(self, chain, layout: object = None) -> tuple[list[int], bool]:
        """The cached blocks laid out for `layout` holding the longest start of `chain` (each entry
        a block's key and its tokens, in order), and whether the block after them is being written."""
        blocks: list[int] = []
        parent = ROOT_KEY
        for key, tokens in chain:
            block = self._by_key.get((layout, key))
            if block is None:
                break
            name = self._names[block]
            if name.parent != parent or name.tokens != tokens:
                break  # another chain's key: a hash collision, not a hit
            if not name.is_cached:
                return blocks, True
            blocks.append(block)
            parent = key
        return blocks, False

    # ------------------------------------------------------------ commands

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise ValueError(f"{self.what}: asked for {count} blocks, {self.num_free} free")
        start = self._next_fresh
        self._next_fresh = min(self.num_blocks, start + count)
        blocks = list(range(start, self._next_fresh))
        if len(blocks) < count:
            take = self._returned.popleft
            blocks += [take() for _ in range(min(count - len(blocks), len(self._returned)))]
        while len(blocks) < count:
            block, _ = self._idle.popitem(last=False)
            self._unname(block)
            blocks.append(block)
        holders = self._holders
        for block in blocks:
            holders[block] = 1
        return blocks

    def hold(self, block_ids: list[int]) -> None:
        """One more block table holds these (cached) blocks."""
        holders = self._holders
        for block in block_ids:
            count = holders.get(block, 0)
            if not count:
                if block not in self._idle:
                    raise ValueError(f"{self.what}: block {block} is neither held nor cached")
                del self._idle[block]
            holders[block] = count + 1

    def free(self, block_ids: list[int]) -> None:
        """One block table lets go of these blocks. A block nobody holds any more is returned, or,
        cached, waits to be found again; one whose writing never finished loses its name."""
        holders = self._holders
        for block in block_ids:
            count = holders.get(block)
            if count is None:
                raise ValueError(f"{self.what}: block {block} is freed but nobody holds it")
            if count > 1:
                holders[block] = count - 1
                continue
            del holders[block]
            name = self._names.get(block)
            if name is not None and name.is_cached:
                self._idle[block] = None
            else:
                if name is not None:
                    self._unname(block)
                self._returned.append(block)

    def name(self, block_id: int, key: int, parent: int, tokens: BlockTokens, layout: object = None) -> bool:
        """Name a held block that a step or copy being planned fills with `tokens`, laid out for
        `layout`; False when the key already names another block of that layout (the two hold the
        same KV: this one stays unnamed)."""
        if (layout, key) in self._by_key or block_id in self._names:
            return False
        self._names[block_id] = _Name(key, parent, tokens, layout)
        self._by_key[(layout, key)] = block_id
        return True

    def cache(self, block_ids: list[int]) -> None:
        """The steps that wrote these named blocks are done: they may be shared."""
        for block in block_ids:
            name = self._names.get(block)
            if name is not None:
                name.is_cached = True

    def forget_names(self, layout: object = None) -> None:
        """Forget the names of blocks laid out for `layout` (it is being left): those cached and
        held by nobody are returned; held blocks stay with their holders."""
        for block in [block for block, name in self._names.items() if name.layout == layout]:
            self._unname(block)
            if block in self._idle:
                del self._idle[block]
                self._returned.append(block)

    def _unname(self, block: int) -> None:
        name = self._names.pop(block)
        del self._by_key[(name.layout, name.key)]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)
