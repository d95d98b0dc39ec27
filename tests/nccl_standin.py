"""A stand-in for `cupy.cuda.nccl` backed by gloo, so the NCCL code path runs on CPU workers.

A communicator joins a gloo group through a file store named by its unique id and, as NCCL's
initialisation does, blocks until every member has arrived (so groups created in different
orders deadlock, as they would on GPUs). Its operations act on the CPU memory at the pointers they
are given, `count` elements from each: a caller that hands over a strided view's pointer gets
exactly what NCCL would do to it. `install()` puts the stand-in in `sys.modules` as `cupy`,
`cupy.cuda` and `cupy.cuda.nccl`; the store files go under $SEESAW_NCCL_STANDIN_DIR.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import sys
import tempfile
import types
from datetime import timedelta

import torch
import torch.distributed as dist

NCCL_INT32, NCCL_INT64, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_BFLOAT16 = range(5)
NCCL_SUM = 0
_DTYPES = {NCCL_INT32: torch.int32, NCCL_INT64: torch.int64, NCCL_FLOAT16: torch.float16,
           NCCL_FLOAT32: torch.float32, NCCL_BFLOAT16: torch.bfloat16}
STANDIN_DIR = "SEESAW_NCCL_STANDIN_DIR"
JOIN_TIMEOUT = "SEESAW_NCCL_STANDIN_TIMEOUT_S"


def get_unique_id() -> tuple[int, ...]:
    """128 signed chars, as cupy hands out NCCL's ncclUniqueId."""
    return tuple(b - 256 if b > 127 else b for b in secrets.token_bytes(128))


def groupStart() -> None:  # noqa: N802 - cupy's names
    pass


def groupEnd() -> None:  # noqa: N802
    pass


def _at(pointer: int, count: int, dtype: int) -> torch.Tensor:
    """The `count` elements of `dtype` at `pointer`, as a tensor over that memory."""
    torch_dtype = _DTYPES[dtype]
    buffer = (ctypes.c_byte * (count * torch_dtype.itemsize)).from_address(pointer)
    return torch.frombuffer(buffer, dtype=torch_dtype, count=count)


class NcclCommunicator:
    """One member of a group of `size`; blocks until every member has joined."""

    def __init__(self, size: int, unique_id: tuple[int, ...], rank: int):
        name = bytes(b % 256 for b in unique_id[:16]).hex()
        folder = os.environ.get(STANDIN_DIR, tempfile.gettempdir())
        timeout = timedelta(seconds=float(os.environ.get(JOIN_TIMEOUT, "60")))
        store = dist.FileStore(os.path.join(folder, f"nccl-{name}"), size)
        store.set_timeout(timeout)
        self.rank, self.size = rank, size
        self._group = dist.ProcessGroupGloo(store, rank, size, timeout)

    def allReduce(self, send: int, recv: int, count: int, dtype: int, op: int, stream: int) -> None:  # noqa: N802
        assert op == NCCL_SUM
        target = _at(recv, count, dtype)
        if send != recv:
            target.copy_(_at(send, count, dtype))
        self._group.allreduce([target]).wait()

    def allGather(self, send: int, recv: int, count: int, dtype: int, stream: int) -> None:  # noqa: N802
        parts = list(_at(recv, count * self.size, dtype).split(count))
        self._group.allgather([parts], [_at(send, count, dtype)]).wait()

    def broadcast(self, send: int, recv: int, count: int, dtype: int, root: int, stream: int) -> None:
        target = _at(recv, count, dtype)
        if send != recv and self.rank == root:
            target.copy_(_at(send, count, dtype))
        options = dist.BroadcastOptions()
        options.rootRank = root
        self._group.broadcast([target], options).wait()

    def send(self, buffer: int, count: int, dtype: int, peer: int, stream: int) -> None:
        self._group.send([_at(buffer, count, dtype)], peer, 0).wait()

    def recv(self, buffer: int, count: int, dtype: int, peer: int, stream: int) -> None:
        self._group.recv([_at(buffer, count, dtype)], peer, 0).wait()


def install() -> None:
    """Make `from cupy.cuda import nccl` find this module (in this process)."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = sys.modules[__name__]
    cupy.cuda = cuda
    sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": sys.modules[__name__]})
