"""A worker's streams, and how its bulk copies reach its device: plain copies on a CPU; on a GPU,
steps and their collectives on a compute stream of the worker's own (never the legacy default
stream, which CUDA graphs cannot capture), side streams for weights and for KV, straight DMA to and
from host memory registered with CUDA (no pageable staging copy), and one wait per command rather
than per copy."""

from __future__ import annotations

import contextlib

import torch

from seesaw.model.weights import WeightSource, load_shard, plain_copy
from seesaw.transport.shared_memory import register_with_cuda, unregister_with_cuda

_CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the pointers


class DeviceCopies:
    """One worker's streams: steps run on `compute_stream` (inside `computing()`), weight and KV
    copies on side streams ordered against it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.compute_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.weight_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.kv_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._memcpy_2d = _cupy_memcpy_2d() if self.is_cuda else None
        self._registered: list[int] = []

    def register(self, tensor: torch.Tensor, what: str) -> None:
        """Pin host memory in place (GPU only), so copies from it are straight DMA."""
        if self.is_cuda:
            self._registered.append(register_with_cuda(tensor, what))

    def close(self) -> None:
        """Unpin what `register` pinned (before its memory is unmapped)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        for pointer in self._registered:
            unregister_with_cuda(pointer)
        self._registered.clear()

    def computing(self):
        """A context in which the calling thread's work (kernels, copies, NCCL calls, events) goes
        to the compute stream; nothing on a CPU."""
        return torch.cuda.stream(self.compute_stream) if self.is_cuda else contextlib.nullcontext()

    # ------------------------------------------------------------ weights

    def load_weights(self, model, weights: WeightSource) -> int:
        """Fill `model` (a ShardModel over the weight arena) from `weights` once the steps queued so
        far are done reading the arena; later steps run after the copies. Returns bytes copied."""
        self.before_weights()
        num_bytes = load_shard(model, weights, self.weight_copy if self.is_cuda else plain_copy)
        self.wait_for_weights()
        return num_bytes

    def before_weights(self) -> None:
        """Order weight copies after every step already queued (they may still read the old weights)."""
        if self.is_cuda:
            self.weight_stream.wait_stream(self.compute_stream)

    def weight_copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        if source.is_cuda:
            # Made on the compute stream (random weights) or earlier on this one (a tied head's
            # rows): wait for it, and keep its memory from being reused before the copy runs.
            self.weight_stream.wait_stream(self.compute_stream)
            source.record_stream(self.weight_stream)
        with torch.cuda.device(self.device), torch.cuda.stream(self.weight_stream):
            destination.copy_(source, non_blocking=True)

    def wait_for_weights(self) -> None:
        """Block until the weight copies are done, and order later steps after them."""
        if self.is_cuda:
            self.weight_stream.synchronize()
            self.compute_stream.wait_stream(self.weight_stream)

    # ------------------------------------------------------------ KV

    def kv_copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Copy each (destination, source) block share, [layers, 2, kv_heads, block_size, head_dim]
        with any layer stride; returns the bytes moved once all are done."""
        num_bytes = sum(source.numel() * source.element_size() for _, source in pairs)
        if not self.is_cuda:
            for destination, source in pairs:
                destination.copy_(source)
            return num_bytes
        # KV written by steps queued so far (on the compute stream) must land before it is read.
        self.kv_stream.wait_stream(self.compute_stream)
        with torch.cuda.device(self.device), torch.cuda.stream(self.kv_stream):
            for destination, source in pairs:
                self._copy_share(destination, source)
        self.kv_stream.synchronize()
        return num_bytes

    def _copy_share(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        if self._memcpy_2d is None or (destination.is_contiguous() and source.is_contiguous()):
            destination.copy_(source, non_blocking=True)
            return
        # One 2-D copy: (layers x 2) runs of [kv_heads, block_size, head_dim], each side with its own pitch.
        itemsize = source.element_size()
        width = destination[0, 0].numel() * itemsize
        height = destination.shape[0] * destination.shape[1]
        self._memcpy_2d(destination.data_ptr(), destination.stride(1) * itemsize, source.data_ptr(),
                        source.stride(1) * itemsize, width, height, _CUDA_MEMCPY_DEFAULT,
                        self.kv_stream.cuda_stream)


def _cupy_memcpy_2d():
    try:
        from cupy.cuda import runtime
    except ImportError:
        return None  # torch's copy_ stages strided copies itself; correct, only slower
    return runtime.memcpy2DAsync
