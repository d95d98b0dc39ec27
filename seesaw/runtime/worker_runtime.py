"""A worker's compute for its whole life: the device, communicators, host buffer and weight
store, the sampler, one weight arena and one KV arena, and a LayoutState per layout of the run.

A transition (`reshard`) lays the next layout's shard over the weight arena and fills it from the
host weight store; the KV arena is never reallocated, only viewed differently. Every method runs
on one of the worker's executor threads, never on its event loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from seesaw.layout import Layout, shard_for
from seesaw.model.cpu_kernels import load_paged_decode
from seesaw.model.llama import LayerKernels, ShardModel
from seesaw.model.rope import inverse_frequencies
from seesaw.model.sampler import Sampler
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import Copy, WeightSource, load_shard, plain_copy
from seesaw.runtime.arena import Arena, KVArena, block_elements, measure
from seesaw.runtime.layout_state import LayoutState, StageContext
from seesaw.runtime.transfers import DeviceCopies
from seesaw.step import StepRow
from seesaw.transport.collective import Communicator, leave_groups
from seesaw.transport.host_buffer import HostBuffer, torch_dtype
from seesaw.transport.weight_store import WeightStore

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class RuntimeConfig:
    """What a worker builds its runtime from (the worker derives it from its load command)."""

    spec: ModelSpec
    rank: int
    layouts: tuple[Layout, ...]  # the run's layouts; the worker starts in the first
    dtype: str
    device: str  # "cpu" or "cuda"
    block_size: int
    kv_cache_bytes: int | None  # None: what the card has left after the weights
    memory_fraction: float
    num_threads: int
    seed: int
    device_index: int = 0  # which of this host's GPUs (the worker's local rank); unused on CPU


class WorkerRuntime:
    """Runs steps, transitions and KV copies for one worker across the run's layouts."""

    def __init__(self, config: RuntimeConfig, communicators: dict[str, Communicator], weights: WeightSource,
                 host_buffer: HostBuffer | None = None):
        started = time.perf_counter()
        spec = config.spec
        self.spec = spec
        self.device = device_for(config.device, config.device_index)
        self.dtype = torch_dtype(config.dtype)
        self.block_size = config.block_size
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        else:
            torch.cuda.set_device(self.device)
        self.weights = weights
        self.communicators = communicators
        self.host_buffer = host_buffer
        self.copies = DeviceCopies(self.device)
        if host_buffer is not None:
            self.copies.register(host_buffer.blocks, "host KV buffer")
        if isinstance(weights, WeightStore):
            self.copies.register(weights.flat, "host weight store")
        shards = [shard_for(layout, spec.shape, config.rank) for layout in dict.fromkeys(config.layouts)]
        weight_bytes = max(measure(lambda a, s=s: ShardModel(spec, s, a), self.dtype) for s in shards)
        self.weight_arena = Arena(weight_bytes, self.device)
        page_elements = max(block_elements(s, self.block_size, spec.head_dim) for s in shards)
        kv_bytes = self._kv_budget(config)
        self.kv_arena = KVArena(kv_bytes, page_elements, self.dtype, self.device)
        is_cpu_float32 = self.device.type == "cpu" and self.dtype == torch.float32
        context = StageContext(
            spec=spec, device=self.device, dtype=self.dtype, block_size=self.block_size,
            inv_freq=inverse_frequencies(spec.rope, spec.head_dim).to(self.device),
            decode_kernel=load_paged_decode() if is_cpu_float32 else None,
            ragged_kernel=_gpu_attention() if self.device.type == "cuda" else None,
        )
        kernels = _gpu_kernels() if self.device.type == "cuda" else LayerKernels()
        self.states: dict[str, LayoutState] = {}
        for shard in shards:
            model = ShardModel(spec, shard, self.weight_arena.allocator(self.dtype), kernels)
            pages = self.kv_arena.pages(shard, self.block_size, spec.head_dim)
            self.states[str(shard.layout)] = LayoutState(shard, model, pages, communicators, context)
        self.current = self.states[str(shards[0].layout)]
        self.sampler = Sampler(self.device, seed=config.seed)
        load_shard(self.current.model, weights, self._weight_copy())
        self.copies.wait_for_weights()
        self.load_s = time.perf_counter() - started

    @property
    def num_blocks(self) -> int:
        """Device KV blocks; a block id names the same bytes under every layout."""
        return self.kv_arena.num_blocks

    @property
    def is_sampling(self) -> bool:
        return self.current.is_sampling

    def _kv_budget(self, config: RuntimeConfig) -> int:
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        # Keep (1 - fraction) of the card and a gibibyte for activations free.
        return int(free - (1.0 - config.memory_fraction) * total - GIB)

    # ------------------------------------------------------------ steps

    def execute(self, rows: list[StepRow]) -> list[int]:
        """One forward pass of this stage over the rows' new tokens; the sampling rank returns a
        token for each row that samples, every other rank an empty list."""
        logits = self.current.forward(rows)
        if logits is None or not self.current.is_sampling:
            return []
        return self.sampler.sample(logits, [row.sampling for row in rows if row.sampling is not None])

    def reshard(self, layout: str) -> tuple[float, int]:
        """Switch to `layout`; returns (seconds, bytes copied), nothing if it is already current."""
        if self.states[layout] is self.current:
            return 0.0, 0
        return self.load(layout)

    def load(self, layout: str) -> tuple[float, int]:
        """Lay `layout`'s shard over the weight arena and fill it from the weight source, layer by
        layer, whatever the arena held; returns (seconds, bytes copied)."""
        started = time.perf_counter()
        target = self.states[layout]
        self.copies.before_weights()  # the last step of the old layout must be done reading
        num_bytes = load_shard(target.model, self.weights, self._weight_copy())
        self.copies.wait_for_weights()
        self.current = target
        return time.perf_counter() - started, num_bytes

    def _weight_copy(self) -> Copy:
        return self.copies.weight_copy if self.device.type == "cuda" else plain_copy

    # ------------------------------------------------------------ KV copies

    def swap_out(self, layout: str, block_ids: list[int], host_block_ids: list[int]) -> int:
        """Copy this worker's share of device blocks (laid out in `layout`) into host blocks; returns bytes."""
        state = self.states[layout]
        share = _host_share(self.host_buffer, state)  # [host blocks, layers, 2, kv_heads, block_size, head_dim]
        pairs = list(zip(block_ids, host_block_ids))
        return self.copies.kv_copy([(share[h], state.kv_pages[b]) for b, h in pairs])

    def prefetch(self, layout: str, host_block_ids: list[int], block_ids: list[int]) -> int:
        """Copy this worker's share of host blocks into device blocks laid out in `layout`; returns bytes."""
        state = self.states[layout]
        share = _host_share(self.host_buffer, state)
        pairs = list(zip(host_block_ids, block_ids))
        return self.copies.kv_copy([(state.kv_pages[b], share[h]) for h, b in pairs])

    def close(self) -> None:
        self.copies.close()
        if self.host_buffer is not None:
            self.host_buffer.close()
        if isinstance(self.weights, WeightStore):
            self.weights.close()
        leave_groups(self.communicators)


def _host_share(host_buffer: HostBuffer | None, state: LayoutState) -> torch.Tensor:
    if host_buffer is None:
        raise ValueError("this engine has no host KV buffer (--host-buffer-gb 0)")
    layers, heads = state.shard.layers, state.shard.kv_heads
    return host_buffer.blocks[:, layers.start : layers.end, :, heads.start : heads.end]


def _gpu_kernels() -> LayerKernels:
    """RMSNorm (with the residual add before it) and the rotation as Triton kernels, or torch's
    where Triton is missing."""
    try:
        from seesaw.model.triton_norm import add_rms_norm_triton, rms_norm_triton
        from seesaw.model.triton_rope import apply_rotation_triton
    except ImportError:
        return LayerKernels()
    return LayerKernels(rms_norm_triton, add_rms_norm_triton, apply_rotation_triton)


def _gpu_attention():
    """The Triton paged-attention kernel, or None (the torch path) where Triton is missing."""
    try:
        from seesaw.model.triton_attention import paged_attention_triton
    except ImportError:
        log.warning("triton is not importable: attention runs on the torch reference path")
        return None
    return paged_attention_triton


def device_for(kind: str, device_index: int) -> torch.device:
    """The worker's device: this host's GPU `device_index` (its local rank), or the CPU."""
    if kind == "cuda":
        count = torch.cuda.device_count()
        if not 0 <= device_index < count:
            raise ValueError(f"this worker's local rank is {device_index}, but this host has {count} GPUs")
        return torch.device("cuda", device_index)
    return torch.device(kind)
