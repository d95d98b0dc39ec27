"""Device memory a worker allocates once as bytes and lays each layout's tensors over.

The weight arena holds one layout's shard at a time: a transition lays the next layout's tensors
over the same bytes and fills them. The KV arena is cut into pages of one size, the largest block
any of the run's layouts needs, so a block id names the same bytes under every layout and a
request's KV can stay on the device while the layout around it changes.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable

import torch

from seesaw.layout import Shard

ALIGN_BYTES = 256
Allocate = Callable[..., torch.Tensor]


def zeroed_bytes(num_bytes: int, device: torch.device, is_lazy: bool = False) -> torch.Tensor:
    """`num_bytes` zero bytes on `device`; lazily on the CPU if asked (pages are mapped on first
    touch, so unused space costs nothing, but the first write to each page is slower).

    Zeros matter for the KV arena: padded attention reads unwritten slots with zero weight, and 0 * NaN is NaN.
    """
    if device.type != "cpu" or not is_lazy:
        return torch.zeros(num_bytes, dtype=torch.uint8, device=device)
    region = mmap.mmap(-1, max(1, num_bytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8, count=num_bytes)


def _aligned(num_bytes: int) -> int:
    return -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES


def measure(build: Callable[[Allocate], object], dtype: torch.dtype) -> int:
    """The bytes `build(allocate)` takes from an arena, found without allocating anything."""
    total = 0

    def allocate(*shape: int) -> torch.Tensor:
        nonlocal total
        total += _aligned(math.prod(shape) * dtype.itemsize)
        return torch.empty(shape, dtype=dtype, device="meta")

    build(allocate)
    return total


class Arena:
    """Bytes allocated (and touched) once; `allocator()` hands out tensor views from the start, in order."""

    def __init__(self, num_bytes: int, device: torch.device):
        self.num_bytes = num_bytes
        self.bytes = zeroed_bytes(num_bytes, device)

    def allocator(self, dtype: torch.dtype) -> Allocate:
        cursor = 0

        def allocate(*shape: int) -> torch.Tensor:
            nonlocal cursor
            size = math.prod(shape) * dtype.itemsize
            if cursor + size > self.num_bytes:
                raise ValueError(f"arena of {self.num_bytes} bytes cannot hold {size} more at {cursor}")
            view = self.bytes[cursor : cursor + size].view(dtype).view(shape)
            cursor += _aligned(size)
            return view

        return allocate


def block_elements(shard: Shard, block_size: int, head_dim: int) -> int:
    """Elements one KV block of this shard holds: its layers, k and v, its KV heads, block_size tokens."""
    return shard.layers.size * 2 * shard.kv_heads.size * block_size * head_dim


class KVArena:
    """The device KV pool: `num_blocks` pages of `num_bytes`, each viewed per layout as that shard's
    block, then `num_padding_pages` more that no request is given (padded decode rows use them)."""

    def __init__(self, num_bytes: int, page_elements: int, dtype: torch.dtype, device: torch.device,
                 num_padding_pages: int = 0):
        self.page_elements = page_elements
        self.dtype = dtype
        self.num_blocks = num_bytes // (page_elements * dtype.itemsize)
        if self.num_blocks < 1:
            raise ValueError(
                f"no room for a KV pool: {num_bytes / 2**30:.3f} GiB left, one block takes "
                f"{page_elements * dtype.itemsize / 2**30:.4f} GiB"
            )
        self.num_pages = self.num_blocks + num_padding_pages
        self.bytes = zeroed_bytes(self.num_pages * page_elements * dtype.itemsize, device, is_lazy=True)
        self._flat = self.bytes.view(dtype)

    def pages(self, shard: Shard, block_size: int, head_dim: int) -> torch.Tensor:
        """The arena as this shard's blocks, padding pages last:
        [pages, layers, 2, kv_heads, block_size, head_dim]."""
        layers, heads = shard.layers.size, shard.kv_heads.size
        shape = (self.num_pages, layers, 2, heads, block_size, head_dim)
        inner = (2 * heads * block_size * head_dim, heads * block_size * head_dim, block_size * head_dim, head_dim, 1)
        return self._flat.as_strided(shape, (self.page_elements, *inner))
