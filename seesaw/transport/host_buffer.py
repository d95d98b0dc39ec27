"""The node's host KV buffer: POSIX shared memory mapped as one tensor in every process.

Blocks are stored heads-major, `[layers, 2, kv_heads, block_size, head_dim]`, so one worker's
share of a block under any layout (its layers x its KV heads) is a run of contiguous pieces.
"""

from __future__ import annotations

import math

import torch

from seesaw.transport.specs import HostBufferSpec
from seesaw.transport.shared_memory import Reaper, SharedSegment

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class HostBuffer:
    """A shared-memory region of `num_blocks` KV blocks; the creator removes it on close."""

    def __init__(self, spec: HostBufferSpec, segment: SharedSegment):
        self.spec = spec
        self._segment = segment
        count = spec.num_blocks * math.prod(spec.block_shape)
        flat = segment.tensor(torch_dtype(spec.dtype), count)
        self.blocks = flat.view(spec.num_blocks, *spec.block_shape)  # [blocks, layers, 2, kv_heads, block_size, head_dim]

    @classmethod
    def create(cls, num_blocks: int, block_shape: list[int], dtype: str, first_block: int = 0,
               reaper: Reaper | None = None) -> HostBuffer:
        """A new buffer of `num_blocks`, numbered from `first_block` (the engine's numbering)."""
        num_bytes = num_blocks * math.prod(block_shape) * torch_dtype(dtype).itemsize
        segment = SharedSegment.create("kv", num_bytes, "host KV buffer", "lower --host-buffer-gb", reaper)
        return cls(HostBufferSpec(segment.name, num_blocks, list(block_shape), dtype, first_block), segment)

    @classmethod
    def attach(cls, spec: HostBufferSpec) -> HostBuffer:
        num_bytes = spec.num_blocks * math.prod(spec.block_shape) * torch_dtype(spec.dtype).itemsize
        return cls(spec, SharedSegment(spec.name, num_bytes, is_owner=False))

    def local(self, host_block_ids: list[int]) -> list[int]:
        """The engine's host block numbers as indices into this buffer; a ValueError for a block
        another node holds."""
        first, count = self.spec.first_block, self.spec.num_blocks
        outside = [block for block in host_block_ids if not first <= block < first + count]
        if outside:
            raise ValueError(f"host blocks {outside[:4]} are not in this node's buffer {self.spec.name} "
                             f"(blocks {first} .. {first + count - 1})")
        return [block - first for block in host_block_ids]

    @property
    def num_bytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()

    def close(self) -> None:
        """Unmap; the owner also removes the segment."""
        self.blocks = None
        self._segment.close()
