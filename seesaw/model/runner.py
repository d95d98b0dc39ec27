"""A worker's compute: its shard of the model, its device KV pool, forward passes and KV copies."""

from __future__ import annotations

import math
import mmap
import time
from pathlib import Path

import torch

from seesaw.layout import Layout, Shard, padded_vocab_rows, shard_for, split_evenly
from seesaw.messages import LoadShard, RowSampling, StepRow
from seesaw.model.attention import RowShape, build_attention_batch
from seesaw.model.cpu_kernels import load_paged_decode
from seesaw.model.llama import ShardModel
from seesaw.model.rope import inverse_frequencies, rotation
from seesaw.model.sampler import Sampler
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import RandomSource, SafetensorsSource, load_shard
from seesaw.transport.collective import Communicator, join_groups, leave_groups
from seesaw.transport.host_buffer import HostBuffer, torch_dtype

GIB = 1 << 30


class ModelRunner:
    """Runs steps for one shard; all methods are called from the worker's executor threads."""

    def __init__(self, command: LoadShard):
        started = time.perf_counter()
        self.spec = ModelSpec.from_hf_config(command.hf_config)
        self.shard: Shard = shard_for(Layout.parse(command.layout), self.spec.shape, command.rank)
        self.device = _device_for(command.device, command.rank)
        self.dtype = torch_dtype(command.dtype)
        self.block_size = command.block_size
        if self.device.type == "cpu":
            torch.set_num_threads(command.num_threads)
        else:
            torch.cuda.set_device(self.device)
        self.communicators = join_groups(command.collective, command.rank, self.device)
        self.tp = self.communicators.get(self.shard.layout.group_key("tp", command.rank))
        self.pp = self.communicators.get(self.shard.layout.group_key("pp", command.rank))
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
        is_cpu_float32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.decode_kernel = load_paged_decode() if is_cpu_float32 else None
        self._vocab_index = self._gathered_vocab_index()
        self.load_s = time.perf_counter() - started

    @property
    def is_sampling(self) -> bool:
        """Whether this rank turns logits into tokens (tensor-parallel rank 0 of the last stage)."""
        return self.shard.is_last_stage and self.shard.tp_rank == 0

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum row-parallel partial outputs over the tensor-parallel group."""
        if self.tp is not None and self.tp.size > 1:
            self.tp.all_reduce(partial)
        return partial

    def _gathered_vocab_index(self) -> torch.Tensor | None:
        if self.tp is None or self.tp.size == 1 or not self.shard.is_last_stage:
            return None
        return gathered_vocab_index(self.spec.vocab_size, self.shard.layout.tp).to(self.device)

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
        """One forward pass of this stage over the rows' new tokens; the sampling rank returns a
        token for each row that samples, every other rank an empty list."""
        logits = self.forward(rows)
        if logits is None or not self.is_sampling:
            return []
        sampling: list[RowSampling] = [row.sampling for row in rows if row.sampling is not None]
        return self.sampler.sample(logits, sampling)

    def forward(self, rows: list[StepRow]) -> torch.Tensor | None:
        """Run this stage; on the last stage, float32 logits [sampled rows, vocab] (every tensor-
        parallel rank gets the gathered logits), elsewhere None."""
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
            batch = build_attention_batch(
                shapes, self.block_size, self.spec.head_dim, self.device, self.decode_kernel, self.dtype
            )
            positions_t = torch.tensor(positions, dtype=torch.long, device=self.device)
            cos, sin = rotation(positions_t, self.inv_freq, self.dtype)
            if self.shard.is_first_stage:
                hidden = self.model.embed_tokens(torch.tensor(token_ids, dtype=torch.long, device=self.device))
            else:
                hidden = torch.empty(len(token_ids), self.spec.hidden_size, dtype=self.dtype, device=self.device)
                self.pp.recv(hidden, self.shard.pp_rank - 1)
            hidden = self.model(hidden, cos, sin, self.kv_cache, batch, self.reduce)
            if not self.shard.is_last_stage:
                self.pp.send(hidden, self.shard.pp_rank + 1)
                return None
            if not last_index:
                return None
            chosen = torch.tensor(last_index, dtype=torch.long, device=self.device)
            logits = self.model.logits(hidden.index_select(0, chosen))  # [sampled rows, vocab rows here]
            if self._vocab_index is not None:
                logits = gather_vocab(self.tp, logits, self._vocab_index)
            return logits

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
        leave_groups(self.communicators)


def gathered_vocab_index(vocab_size: int, tp: int) -> torch.Tensor:
    """Positions of the real vocabulary rows in logits gathered from `tp` equally padded shards."""
    padded = padded_vocab_rows(vocab_size, tp)
    spans = split_evenly(vocab_size, tp)
    return torch.cat([torch.arange(span.size) + part * padded for part, span in enumerate(spans)])


def gather_vocab(tp: Communicator, logits: torch.Tensor, vocab_index: torch.Tensor) -> torch.Tensor:
    """Whole-vocabulary logits [rows, vocab] from each tensor-parallel rank's [rows, padded slice]."""
    gathered = tp.all_gather(logits.t().contiguous())  # [tp * padded slice, rows]
    return gathered.index_select(0, vocab_index).t()


def _device_for(kind: str, rank: int) -> torch.device:
    """Worker i owns this host's device i (ranks on a host are consecutive)."""
    if kind == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(kind)


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
    code = int(getattr(status, "value", status))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of the host KV buffer failed with status {code}")
