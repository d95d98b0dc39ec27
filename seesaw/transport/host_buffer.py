"""The node's host KV buffer: POSIX shared memory mapped as one tensor in every process.

Blocks are stored heads-major, `[layers, 2, kv_heads, block_size, head_dim]`, so one
tensor-parallel shard of a block is a contiguous run of heads.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
from pathlib import Path

import torch

from seesaw.messages import HostBufferSpec

SHM_DIR = Path("/dev/shm")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class HostBuffer:
    """A shared-memory region of `num_blocks` KV blocks; the creator unlinks it on close."""

    def __init__(self, spec: HostBufferSpec, is_owner: bool):
        self.spec = spec
        self.is_owner = is_owner
        dtype = torch_dtype(spec.dtype)
        block_elements = math.prod(spec.block_shape)
        size_bytes = max(1, spec.num_blocks * block_elements * dtype.itemsize)
        path = SHM_DIR / spec.name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if is_owner else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if is_owner:
                _reserve(fd, size_bytes, path)
            self._map = mmap.mmap(fd, size_bytes)
        finally:
            os.close(fd)
        flat = torch.frombuffer(self._map, dtype=dtype, count=spec.num_blocks * block_elements)
        self.blocks = flat.view(spec.num_blocks, *spec.block_shape)  # [blocks, layers, 2, kv_heads, block_size, head_dim]

    @classmethod
    def create(cls, num_blocks: int, block_shape: list[int], dtype: str) -> HostBuffer:
        name = f"seesaw-kv-{os.getpid()}-{secrets.token_hex(4)}"
        return cls(HostBufferSpec(name, num_blocks, list(block_shape), dtype), is_owner=True)

    @classmethod
    def attach(cls, spec: HostBufferSpec) -> HostBuffer:
        return cls(spec, is_owner=False)

    def close(self) -> None:
        """Unmap; the owner also removes the segment so nothing outlives the engine."""
        self.blocks = None
        # If a view is still alive somewhere, the mapping goes with the process instead.
        with contextlib.suppress(BufferError):
            self._map.close()
        if self.is_owner:
            (SHM_DIR / self.spec.name).unlink(missing_ok=True)


def _reserve(fd: int, size_bytes: int, path: Path) -> None:
    """Back the whole segment now: a sparse one would kill a worker with SIGBUS when it fills up."""
    try:
        os.posix_fallocate(fd, 0, size_bytes)
    except OSError as error:
        path.unlink(missing_ok=True)
        free = os.statvfs(SHM_DIR)
        raise ValueError(
            f"cannot reserve {size_bytes / 2**30:.2f} GiB of shared memory for the host KV buffer "
            f"({SHM_DIR} has {free.f_bavail * free.f_frsize / 2**30:.2f} GiB free): lower --host-buffer-gb"
        ) from error
