"""A step's inputs as the forward pass reads them, built once per step: the rows' tokens and
positions, which rows sample, and the attention metadata, packed into one flat int32 array that
reaches the device in one copy.

Workers keep each request's block table (`BlockTables`), updated by the deltas rows carry; on GPUs
it is mirrored on the device, one row per request, and a step's table is gathered there. A row
that awaits its first token takes it on the device from the tokens the step before sampled
(`SampledTokens`), so planning a step never waits for the one before it to finish.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from seesaw.model.attention import (
    AttentionBatch,
    AttentionTiles,
    KVWriter,
    RaggedKernel,
    RaggedRows,
    RowShape,
    build_attention_batch,
    tile_map,
    tile_tokens,
)
from seesaw.model.cpu_kernels import PagedDecode
from seesaw.step import StepRow


@dataclass
class SampledTokens:
    """The tokens one step sampled, left on the device for the next step's rows that await them."""

    index: dict[str, int]  # request id -> its place in `tokens`
    tokens: torch.Tensor  # [sampled rows] int64 on the device


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # [num_tokens] int32 on the device
    positions: torch.Tensor  # [num_tokens] int32
    sample_index: torch.Tensor  # [sampled rows] int32: each sampling row's last token in the step
    attention: AttentionBatch
    sampled_ids: list[str]  # the requests of the sampling rows, in order


class BlockTables:
    """Each request's KV block ids as this worker holds them; with `mirrored`, also a device table
    [slots, columns] int32 with one slot per request, grown (never shrunk) as needed."""

    def __init__(self, device: torch.device, mirrored: bool):
        self.device = device
        self.mirrored = mirrored
        self.blocks: dict[str, list[int]] = {}
        self.slots: dict[str, int] = {}
        self._free_slots: list[int] = []
        self.table = torch.zeros(64, 16, dtype=torch.int32, device=device) if mirrored else None

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.blocks.pop(request_id, None)
            slot = self.slots.pop(request_id, None)
            if slot is not None:
                self._free_slots.append(slot)

    def update(self, rows: list[StepRow]) -> list[tuple[int, int, int]]:
        """Apply the rows' deltas; returns the device table's changed entries (slot, column, block)."""
        writes = []
        for row in rows:
            blocks = self.blocks.setdefault(row.request_id, [])
            if row.first_new_block > len(blocks):
                raise ValueError(f"request {row.request_id}'s row adds blocks from index {row.first_new_block}, "
                                 f"but this worker holds only {len(blocks)} of its blocks")
            del blocks[row.first_new_block:]
            blocks.extend(row.new_block_ids)
            if self.mirrored and row.new_block_ids:
                slot = self._slot(row.request_id)
                writes.extend((slot, row.first_new_block + i, block) for i, block in enumerate(row.new_block_ids))
        if writes:
            self._fit(max(slot for slot, _, _ in writes) + 1, max(column for _, column, _ in writes) + 1)
        return writes

    def _slot(self, request_id: str) -> int:
        slot = self.slots.get(request_id)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self.slots)
            self.slots[request_id] = slot
        return slot

    def _fit(self, num_slots: int, num_columns: int) -> None:
        rows, columns = self.table.shape
        if num_slots <= rows and num_columns <= columns:
            return
        grown = torch.zeros(max(rows, _power_of_two(num_slots)), max(columns, _power_of_two(num_columns)),
                            dtype=torch.int32, device=self.device)
        grown[:rows, :columns] = self.table
        self.table = grown


class Uploader:
    """Step inputs to the device in one non-blocking copy from pinned memory. The two host staging
    buffers take turns, each refilled only once its last copy is done; the device buffer persists
    across steps (a fixed address, as captured CUDA graphs need), and the stream orders each copy
    after the steps still reading the last one."""

    def __init__(self, device: torch.device):
        self.device = device
        self._turn = 0
        self._staging: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event] = []
        self._on_device = torch.empty(0, dtype=torch.int32, device=device)

    def upload(self, values: list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.int32)  # [n]
        if self.device.type == "cpu":
            return host
        if len(values) > self._on_device.numel():
            self._grow(_power_of_two(len(values)))
        staging, copied = self._staging[self._turn], self._copied[self._turn]
        copied.synchronize()
        staging[: len(values)] = host
        out = self._on_device[: len(values)]
        out.copy_(staging[: len(values)], non_blocking=True)
        copied.record()
        self._turn ^= 1
        return out

    def _grow(self, size: int) -> None:
        for event in self._copied:
            event.synchronize()
        self._staging = [torch.empty(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(2)]
        for event in self._copied:
            event.record()
        self._on_device = torch.empty(size, dtype=torch.int32, device=self.device)


@dataclass(frozen=True)
class AttentionKernels:
    """How a worker attends: a ragged kernel reading the cache in place (GPUs), with a writer that
    puts a step's new k/v in the cache in one launch; else the torch path with the CPU decode
    kernel where it is built. `group`: query heads per KV head, which sets the ragged kernel's tiles."""

    block_size: int
    head_dim: int
    dtype: torch.dtype
    decode_kernel: PagedDecode | None = None
    ragged_kernel: RaggedKernel | None = None
    kv_writer: KVWriter | None = None
    group: int = 1


SEGMENT_ALIGN = 4  # int32 values: each segment of the upload starts on 16 bytes, as Triton's loads assume


def build_step_inputs(rows: list[StepRow], released: list[str], tables: BlockTables, before: SampledTokens | None,
                      kernels: AttentionKernels, uploader: Uploader) -> StepInputs:
    """The step's inputs on the device, after forgetting `released` requests and applying the rows'
    block deltas; `before`: what the previous step sampled, for rows that await their token."""
    tables.release(released)
    writes = tables.update(rows)
    token_ids: list[int] = []
    positions: list[int] = []
    fills: list[tuple[int, int]] = []  # (place in the step, place in `before.tokens`)
    sample_index: list[int] = []
    sampled_ids: list[str] = []
    for row in rows:
        if row.awaits_token:
            fills.append((len(token_ids), _awaited(row, before)))
            token_ids.append(0)
        token_ids.extend(row.token_ids)
        positions.extend(range(row.start, row.start + row.num_new_tokens))
        if row.sampling is not None:
            sample_index.append(len(token_ids) - 1)
            sampled_ids.append(row.request_id)
    shapes = [RowShape(row.start, row.num_new_tokens, tables.blocks[row.request_id]) for row in rows]
    ragged = kernels.ragged_kernel is not None
    fill_places, fill_sources = ([list(column) for column in zip(*fills)] if fills else [[], []])
    write_slots, write_columns, write_blocks = ([list(column) for column in zip(*writes)] if writes else [[], [], []])
    segments = [token_ids, positions, sample_index, fill_places, fill_sources, write_slots, write_columns, write_blocks]
    if ragged:
        segments += _ragged_segments(shapes, tables, rows, kernels)
    flat = uploader.upload(_padded(segments))
    parts = _unpadded(flat, [len(segment) for segment in segments])
    token_ids_t, positions_t, sample_t, fill_places, fill_sources, write_slots, write_columns, write_blocks = parts[:8]
    if fills:
        token_ids_t[fill_places.long()] = before.tokens[fill_sources.long()].to(torch.int32)
    if writes:
        tables.table[write_slots.long(), write_columns.long()] = write_blocks
    if ragged:
        attention = _ragged_batch(parts[8:], tables, shapes, kernels)
    else:
        attention = build_attention_batch(shapes, kernels.block_size, kernels.head_dim, flat.device,
                                          kernels.decode_kernel, kernels.dtype)
    return StepInputs(token_ids_t, positions_t, sample_t, attention, sampled_ids)


def _awaited(row: StepRow, before: SampledTokens | None) -> int:
    if before is None or row.request_id not in before.index:
        raise ValueError(f"request {row.request_id}'s row awaits the token the step before sampled for it, "
                         f"but that step did not sample it on this worker")
    return before.index[row.request_id]


def _padded(segments: list[list[int]]) -> list[int]:
    """The segments end to end, each padded with zeros to a multiple of SEGMENT_ALIGN values."""
    flat: list[int] = []
    for segment in segments:
        flat.extend(segment)
        flat.extend([0] * (-len(segment) % SEGMENT_ALIGN))
    return flat


def _unpadded(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Each segment's view of the padded upload."""
    parts, start = [], 0
    for length in lengths:
        parts.append(flat[start : start + length])
        start += length + (-length % SEGMENT_ALIGN)
    return parts


def _ragged_segments(shapes: list[RowShape], tables: BlockTables, rows: list[StepRow], kernels: AttentionKernels):
    """Where each new token's k/v goes, each row's first token and context, its table slot, and
    the step's query tiles."""
    block_size = kernels.block_size
    write_blocks: list[int] = []
    write_offsets: list[int] = []
    for shape in shapes:
        for position in range(shape.start, shape.start + shape.num_new):
            write_blocks.append(shape.block_ids[position // block_size])
            write_offsets.append(position % block_size)
    starts = [0, *itertools.accumulate(shape.num_new for shape in shapes)]
    contexts = [shape.start + shape.num_new for shape in shapes]
    slots = [tables.slots[row.request_id] for row in rows]
    tile = tile_tokens(starts[-1], len(shapes), kernels.group)
    tile_rows, tile_firsts, tile_sizes = tile_map([shape.num_new for shape in shapes], tile)
    return [write_blocks, write_offsets, starts, contexts, slots, tile_rows, tile_firsts, tile_sizes]


def _ragged_batch(parts: list[torch.Tensor], tables: BlockTables, shapes: list[RowShape],
                  kernels: AttentionKernels) -> AttentionBatch:
    write_blocks, write_offsets, starts, contexts, slots, tile_rows, tile_firsts, tile_sizes = parts
    max_blocks = max(-(-(shape.start + shape.num_new) // kernels.block_size) for shape in shapes)
    block_table = tables.table.index_select(0, slots)[:, :max_blocks].contiguous()  # [rows, max_blocks]
    tiles = AttentionTiles(tile_rows, tile_firsts, tile_sizes,
                           tile_tokens(write_blocks.shape[0], len(shapes), kernels.group))
    return AttentionBatch(
        write_blocks=write_blocks, write_offsets=write_offsets, decode=None, prefills=[],
        scale=kernels.head_dim**-0.5, ragged=RaggedRows(starts, contexts, block_table, tiles),
        ragged_kernel=kernels.ragged_kernel, kv_writer=kernels.kv_writer,
    )


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
