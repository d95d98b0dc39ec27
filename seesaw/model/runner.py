"""A worker's compute: its shard of the model, its device KV pool, forward passes and KV copies."""

from __future__ import annotations

import math
import mmap
import time
from pathlib import Path

import torch

from seesaw.layout import Layout, Shard, shard_for
from seesaw.messages import LoadShard, RowSampling, StepRow
from seesaw.model.attention import RowShape, build_attention_batch
from seesaw.model.llama import Reduce, ShardModel
from seesaw.model.rope import inverse_frequencies, rotation
from seesaw.model.sampler import Sampler
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import RandomSource, SafetensorsSource, load_shard
from seesaw.transport.host_buffer import HostBuffer, torch_dtype

GIB = 1 << 30


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ModelRunner:
    """Runs steps for one shard; all methods are called from the worker's executor threads."""

    def __init__(self, command: LoadShard, reduce: Reduce = _identity):
        started = time.perf_counter()
        self.spec = ModelSpec.from_hf_config(command.hf_config)
        self.shard: Shard = shard_for(Layout.parse(command.layout), self.spec.shape, command.rank)
        self.device = torch.device(command.device)
        self.dtype = torch_dtype(command.dtype)
        self.block_size = command.block_size
        self.reduce = reduce
        if self.device.type == "cpu":
            torch.set_num_threads(command.num_threads)
        self.model = ShardModel(self.spec, self.shard, self.dtype, self.device)
        source = (
            SafetensorsSource(Path(command.weights_folder))
            if command.weights_folder
            else RandomSource(self.spec, command.dummy_seed, self.device)
        )
        load_shard(self.model, source)
        self.inv_freq = inverse_frequencies(self.spec.rope, self.spec.head_dim).to(self.device)
        self.num_blocks = self._pool_blocks(command)
        # [layers_in_shard, 2 (k, v), slots, kv_heads_in_shard, head_dim]
        self.kv_cache = _zeroed(
            (self.shard.layers.size, 2, self.num_blocks * self.block_size, self.shard.kv_heads.size,
             self.spec.head_dim), self.dtype, self.device,
        )
        self.host_buffer = HostBuffer.attach(command.host_buffer) if command.host_buffer else None
        if self.host_buffer is not None and self.device.type == "cuda":
            _register_host_memory(self.host_buffer)
        self.sampler = Sampler(self.device, seed=command.dummy_seed)
        self.load_s = time.perf_counter() - started

    @property
    def block_bytes(self) -> int:
        return (
            self.shard.layers.size * 2 * self.block_size * self.shard.kv_heads.size
            * self.spec.head_dim * self.dtype.itemsize
        )

    def _pool_blocks(self, command: LoadShard) -> int:
        if command.kv_cache_bytes is not None:
            budget = command.kv_cache_bytes
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            # Keep (1 - fraction) of the card and a gibibyte for activations free.
            budget = free - (1.0 - command.memory_fraction) * total - GIB
        num_blocks = int(budget // self.block_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"no room for a KV pool: {budget / GIB:.2f} GiB left, one block takes "
                f"{self.block_bytes / GIB:.4f} GiB"
            )
        return num_blocks

    def execute(self, rows: list[StepRow]) -> list[int]:
        """One forward pass over the rows' new tokens; a token for each row that samples."""
        token_ids: list[int] = []
        positions: list[int] = []
        shapes: list[RowShape] = []
        last_index: list[int] = []
        for row in rows:
            token_ids.extend(row.token_ids)
            positions.extend(range(row.start, row.start + len(row.token_ids)))
            shapes.append(RowShape(row.start, len(row.token_ids), row.block_ids))
            if row.sampling is not None:
                last_index.append(len(token_ids) - 1)
        with torch.inference_mode():
            batch = build_attention_batch(shapes, self.block_size, self.spec.head_dim, self.device)
            positions_t = torch.tensor(positions, dtype=torch.long, device=self.device)
            cos, sin = rotation(positions_t, self.inv_freq, self.dtype)
            hidden = self.model.embed_tokens(torch.tensor(token_ids, dtype=torch.long, device=self.device))
            hidden = self.model(hidden, cos, sin, self.kv_cache, batch, self.reduce)
            if not last_index:
                return []
            chosen = torch.tensor(last_index, dtype=torch.long, device=self.device)
            logits = self.model.logits(hidden.index_select(0, chosen))  # [sampled rows, vocab]
            sampling: list[RowSampling] = [row.sampling for row in rows if row.sampling is not None]
            return self.sampler.sample(logits, sampling)

    def swap_out(self, block_ids: list[int], host_block_ids: list[int]) -> None:
        """Copy this shard's part of device blocks into host blocks."""
        device_blocks = self._blocks_view().index_select(2, self._index(block_ids))  # [L, 2, n, bs, kvh, hd]
        host_view = device_blocks.permute(2, 0, 1, 4, 3, 5).to("cpu")  # [n, L, 2, kvh, bs, hd]
        layers, heads = self.shard.layers, self.shard.kv_heads
        target = torch.tensor(host_block_ids, dtype=torch.long)
        self.host_buffer.blocks[target, layers.start : layers.end, :, heads.start : heads.end] = host_view
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def prefetch(self, host_block_ids: list[int], block_ids: list[int]) -> None:
        """Copy host blocks into this shard's device blocks."""
        layers, heads = self.shard.layers, self.shard.kv_heads
        source = self.host_buffer.blocks[torch.tensor(host_block_ids, dtype=torch.long)]
        source = source[:, layers.start : layers.end, :, heads.start : heads.end]  # [n, L, 2, kvh, bs, hd]
        values = source.to(self.device, non_blocking=True).permute(1, 2, 0, 4, 3, 5)  # [L, 2, n, bs, kvh, hd]
        view = self._blocks_view()
        view[:, :, self._index(block_ids[: len(host_block_ids)])] = values
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _blocks_view(self) -> torch.Tensor:
        layers, _, _, heads, head_dim = self.kv_cache.shape
        return self.kv_cache.view(layers, 2, self.num_blocks, self.block_size, heads, head_dim)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def close(self) -> None:
        if self.host_buffer is not None:
            self.host_buffer.close()


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU its pages are mapped lazily, so an unused pool costs nothing.

    Zeros matter: padded attention reads unwritten slots with zero weight, and 0 * NaN is NaN.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=dtype, count=math.prod(shape)).view(shape)


def _register_host_memory(buffer: HostBuffer) -> None:
    """Pin the shared host buffer so device copies go straight to and from it."""
    blocks = buffer.blocks
    size = blocks.numel() * blocks.element_size()
    status = torch.cuda.cudart().cudaHostRegister(blocks.data_ptr(), size, 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of the host KV buffer failed with status {int(status)}")
