"""Bulk tensor movement between workers: one Communicator protocol, NCCL (cupy) on GPUs, gloo on CPUs.

Groups for every layout the run uses are made once at start-up, so a transition swaps references,
never a rendezvous. Every transfer is announced by a control message first, so peers post
matching operations in the same order.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Protocol

import torch

from seesaw.transport.addresses import JoinError
from seesaw.transport.specs import Backend, CollectiveSpec, GroupSpec


class Communicator(Protocol):
    """Collectives over one group of workers; `rank` and `peer` are positions in the group."""

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the group, in place."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every member's `tensor` along dim 0, in group order."""

    def send(self, tensor: torch.Tensor, peer: int) -> None: ...

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        """Fill `tensor` (already shaped) from `peer`."""

    def broadcast(self, tensor: torch.Tensor, root: int) -> None: ...

    def barrier(self) -> None: ...


def free_tcp_address(ip: str = "127.0.0.1") -> str:
    """A `tcp://ip:port` of this host that is free right now, for a gloo rendezvous; `ip` is the
    address the replica's other workers reach this host at."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return f"tcp://{ip}:{sock.getsockname()[1]}"



def make_nccl_id() -> list[int]:
    """A fresh NCCL unique id as plain ints (it travels in a control message)."""
    from cupy.cuda import nccl

    return list(nccl.get_unique_id())


class GlooCommunicator:
    """torch.distributed gloo over one subgroup of the process group; `ranks` are world ranks."""

    def __init__(self, group, ranks: list[int], world_rank: int):
        self.group = group
        self.ranks = ranks
        self.rank = ranks.index(world_rank)
        self.size = len(ranks)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        torch.distributed.all_reduce(tensor, group=self.group)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        torch.distributed.send(tensor.contiguous(), dst=self.ranks[peer], group=self.group)

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        torch.distributed.recv(tensor, src=self.ranks[peer], group=self.group)

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        torch.distributed.broadcast(tensor, src=self.ranks[root], group=self.group)

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.group)


def gloo_groups(init_address: str, global_rank: int, world_size: int, groups: list[GroupSpec],
                timeout_s: float, first_rank: int = 0) -> dict[str, GlooCommunicator]:
    """Join the gloo world of ranks first_rank .. first_rank + world_size - 1 and create every
    group; every rank must pass the same `groups` (global ranks) in order."""
    world_rank = global_rank - first_rank
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=init_address, rank=world_rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as error:  # torch's store and gloo errors: said plainly instead
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise JoinError(
            f"rank {global_rank} could not form its communicator groups through the rendezvous at {init_address} "
            f"within {timeout_s:.0f} s ({first}). Rank {first_rank} listens there: if the other workers' hosts "
            f"cannot reach that address, give that worker --advertise-address (or set GLOO_SOCKET_IFNAME)"
        ) from None
    communicators = {}
    for spec in groups:
        ranks = [rank - first_rank for rank in spec.ranks]
        # new_group is collective over the world: every rank creates every group.
        group = torch.distributed.new_group(ranks, backend="gloo")
        if world_rank in ranks:
            communicators[spec.key] = GlooCommunicator(group, ranks, world_rank)
    return communicators


def join_groups(spec: CollectiveSpec | None, global_rank: int, device: torch.device,
                timeout_s: float = 300.0) -> dict[str, Communicator]:
    """This rank's communicators for every group of the run (none for a single worker on a CPU)."""
    if spec is None:
        return {}
    if spec.backend == Backend.NCCL:
        return nccl_groups(spec.groups, global_rank, device, timeout_s)
    if spec.backend == Backend.GLOO:
        return gloo_groups(spec.init_address, global_rank, spec.world_size, spec.groups, timeout_s, spec.first_rank)
    raise ValueError(f"unknown collective backend {spec.backend!r}")


def leave_groups(communicators: dict[str, Communicator]) -> None:
    if any(isinstance(c, GlooCommunicator) for c in communicators.values()) and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_NCCL_TYPES = {torch.float32: "NCCL_FLOAT32", torch.bfloat16: "NCCL_BFLOAT16", torch.float16: "NCCL_FLOAT16",
               torch.int64: "NCCL_INT64", torch.int32: "NCCL_INT32"}


class NcclCommunicator:
    """cupy's NCCL over one group, on torch's current CUDA stream (a worker's compute stream, in
    its steps), tensors passed by pointer (so every tensor handed to NCCL is contiguous: a strided
    view is reduced through a contiguous copy)."""

    def __init__(self, spec: GroupSpec, global_rank: int, device: torch.device):
        from cupy.cuda import nccl

        self._nccl = nccl
        self.key = spec.key
        self.ranks = spec.ranks
        self.rank = spec.ranks.index(global_rank)
        self.size = len(spec.ranks)
        self.device = device
        if device.type == "cuda":  # NCCL binds a communicator to the current device; this thread stays on it
            torch.cuda.set_device(device)
        self._comm = nccl.NcclCommunicator(self.size, tuple(spec.nccl_id), self.rank)

    def _type(self, tensor: torch.Tensor) -> int:
        if tensor.dtype not in _NCCL_TYPES:
            raise ValueError(f"NCCL group {self.key} cannot carry {tensor.dtype} tensors")
        return getattr(self._nccl, _NCCL_TYPES[tensor.dtype])

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        def reduce(flat: torch.Tensor) -> None:
            self._comm.allReduce(flat.data_ptr(), flat.data_ptr(), flat.numel(), self._type(flat),
                                 self._nccl.NCCL_SUM, self._stream())

        _in_place(tensor, reduce)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        self._comm.allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(), self._type(tensor), self._stream())
        return out

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.contiguous()
        self._nccl.groupStart()
        self._comm.send(tensor.data_ptr(), tensor.numel(), self._type(tensor), peer, self._stream())
        self._nccl.groupEnd()

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        def receive(flat: torch.Tensor) -> None:
            self._nccl.groupStart()
            self._comm.recv(flat.data_ptr(), flat.numel(), self._type(flat), peer, self._stream())
            self._nccl.groupEnd()

        _in_place(tensor, receive)

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        def broadcast(flat: torch.Tensor) -> None:
            self._comm.broadcast(flat.data_ptr(), flat.data_ptr(), flat.numel(), self._type(flat), root,
                                 self._stream())

        _in_place(tensor, broadcast)

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _in_place(tensor: torch.Tensor, operation: Callable[[torch.Tensor], None]) -> None:
    """Run `operation` on `tensor`'s memory by pointer: directly when it is contiguous, else on a
    contiguous copy whose result is copied back (NCCL sees only `numel` elements from the pointer)."""
    if tensor.is_contiguous():
        operation(tensor)
        return
    flat = tensor.contiguous()
    operation(flat)
    tensor.copy_(flat)


def nccl_groups(groups: list[GroupSpec], global_rank: int, device: torch.device,
                timeout_s: float = 300.0) -> dict[str, NcclCommunicator]:
    """One NCCL communicator per group this rank belongs to, in the shared order. NCCL's own
    initialisation waits for every member without a limit; here each group has `timeout_s`, and a
    group that does not form is a JoinError naming it (the stuck thread ends with the process)."""
    communicators = {}
    joiner = ThreadPoolExecutor(1, thread_name_prefix="nccl-join")
    try:
        for spec in groups:
            if global_rank not in spec.ranks:
                continue
            future = joiner.submit(NcclCommunicator, spec, global_rank, device)
            try:
                communicators[spec.key] = future.result(timeout=timeout_s)
            except FutureTimeout:
                raise JoinError(
                    f"rank {global_rank} waited {timeout_s:.0f} s for NCCL group {spec.key} (ranks "
                    f"{', '.join(map(str, spec.ranks))}) to form: a member is dead, stuck, or creating its groups "
                    f"in another order") from None
    finally:
        joiner.shutdown(wait=False, cancel_futures=True)
    return communicators
