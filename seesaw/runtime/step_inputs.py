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
from seesaw.runtime.step_bounds import SEGMENT_ALIGN, StepBounds, bucket_for, padded_length
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
    scoring: PromptScoring | None = None


@dataclass
class PromptScoring:
    """The places in a step whose next prompt token's log-probability is reported (echo): the
    logits at `places` ([n] int32) score `targets` ([n] int32); `spans` says whose they are:
    (request id, position of its first target, how many, alternatives it asked for) in order, and
    `top` the most alternatives any asked for."""

    places: torch.Tensor
    targets: torch.Tensor
    spans: list[tuple[str, int, int, int]]
    top: int


class BlockTables:
    """Each request's KV block ids as this worker holds them; with `mirrored`, also a device table
    [requests, columns] int32, allocated once from `bounds` (a captured graph reads it in place):
    a row per request, reused once the request is released, and a last row for padding rows,
    every entry of it the padding block."""

    def __init__(self, device: torch.device, mirrored: bool, bounds: StepBounds = StepBounds()):
        self.device = device
        self.mirrored = mirrored
        self.bounds = bounds
        self.blocks: dict[str, list[int]] = {}
        self.slots: dict[str, int] = {}
        self._free_slots: list[int] = []
        self.table = self.step_table = None
        self.padding_slot = bounds.table_shape[0] - 1
        if mirrored:
            self.table = torch.zeros(bounds.table_shape, dtype=torch.int32, device=device)  # [slots, columns]
            self.table[self.padding_slot].fill_(bounds.padding_block)
            # A decode step's rows' tables, gathered in place: [max_rows, columns]
            self.step_table = torch.zeros(bounds.max_rows, bounds.table_shape[1], dtype=torch.int32, device=device)

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
                if len(blocks) > self.bounds.max_blocks_per_request:
                    raise ValueError(f"request {row.request_id} holds {len(blocks)} blocks, but the device block "
                                     f"table has {self.bounds.max_blocks_per_request} columns (the model's length)")
                slot = self._slot(row.request_id)
                writes.extend((slot, row.first_new_block + i, block) for i, block in enumerate(row.new_block_ids))
        return writes

    def gather(self, slots: torch.Tensor, width: int | None) -> torch.Tensor:
        """The tables of the rows at `slots` ([rows] int32): every column into the fixed step table
        when `width` is None (a decode step of a bucket), else their first `width` columns anew."""
        if width is None:
            return torch.index_select(self.table, 0, slots, out=self.step_table[: slots.shape[0]])
        return self.table.index_select(0, slots)[:, :width].contiguous()  # [rows, width]

    def _slot(self, request_id: str) -> int:
        slot = self.slots.get(request_id)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self.slots)
            if slot >= self.padding_slot:
                raise ValueError(f"request {request_id} needs a row of the device block table, but all "
                                 f"{self.padding_slot} (one per KV block) hold other requests' tables")
            self.slots[request_id] = slot
        return slot


class Uploader:
    """Step inputs to the device in one non-blocking copy from pinned memory, into one device
    buffer of `capacity` int32 values allocated once (a fixed address, as captured CUDA graphs
    need). The two host staging buffers take turns, each rewritten only once the copy that last
    read it is done; the stream orders each copy after the steps still reading the last one."""

    def __init__(self, device: torch.device, capacity: int = StepBounds().upload_values(is_ragged=True)):
        self.device = device
        self.capacity = capacity
        self._turn = 0
        self.is_staged = device.type == "cuda"
        if self.is_staged:
            self.staging = [torch.empty(capacity, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.on_device = torch.empty(capacity, dtype=torch.int32, device=device)  # [capacity]

    def upload(self, values: list[int]) -> torch.Tensor:
        if len(values) > self.capacity:
            raise ValueError(f"a step's inputs take {len(values)} values, past the {self.capacity} its upload "
                             f"buffer was sized for (its token budget, row cap and model length)")
        host = torch.tensor(values, dtype=torch.int32)  # [n]
        if not self.is_staged:
            return host
        staging, copied = self.staging[self._turn], self.copied[self._turn]
        copied.synchronize()
        staging[: len(values)].copy_(host)
        out = self.on_device[: len(values)]
        out.copy_(staging[: len(values)], non_blocking=True)
        copied.record()
        self._turn ^= 1
        return out


@dataclass(frozen=True)
class AttentionKernels:
    """How a worker attends: a ragged kernel reading the cache in place (GPUs), with a writer that
    puts a step's new k/v in the cache in one launch; else the torch path with the CPU decode
    kernel where it is built. `group`: query heads per KV head, which sets the ragged kernel's tiles.
    `decode_buckets`: with a ragged kernel, the batch sizes decode steps are padded to (none: no padding)."""

    block_size: int
    head_dim: int
    dtype: torch.dtype
    decode_kernel: PagedDecode | None = None
    ragged_kernel: RaggedKernel | None = None
    kv_writer: KVWriter | None = None
    group: int = 1
    decode_buckets: tuple[int, ...] = ()


def build_step_inputs(rows: list[StepRow], released: list[str], tables: BlockTables, before: SampledTokens | None,
                      kernels: AttentionKernels, uploader: Uploader) -> StepInputs:
    """The step's inputs on the device, after forgetting `released` requests and applying the rows'
    block deltas; `before`: what the previous step sampled, for rows that await their token.

    A decode step (one new token per row) with a ragged kernel is padded up to its bucket with
    rows that write to and read only the padding block, and the inputs its forward pass reads come
    first in the upload, at places and sizes set by the bucket alone: every decode step of a bucket
    presents the same tensors, so a graph captured for the bucket can replay it."""
    tables.release(released)
    writes = tables.update(rows)
    token_ids: list[int] = []
    positions: list[int] = []
    fills: list[tuple[int, int]] = []  # (place in the step, place in `before.tokens`)
    sample_index: list[int] = []
    sampled_ids: list[str] = []
    score_places: list[int] = []
    score_targets: list[int] = []
    spans: list[tuple[str, int, int, int]] = []
    for row in rows:
        if row.awaits_token:
            fills.append((len(token_ids), _awaited(row, before)))
            token_ids.append(0)
        if row.score_prompt is not None:
            targets = row.token_ids[1:] + ([] if row.next_prompt_token is None else [row.next_prompt_token])
            score_places.extend(range(len(token_ids), len(token_ids) + len(targets)))
            score_targets.extend(targets)
            spans.append((row.request_id, row.start + 1, len(targets), row.score_prompt))
        token_ids.extend(row.token_ids)
        positions.extend(range(row.start, row.start + row.num_new_tokens))
        if row.sampling is not None:
            sample_index.append(len(token_ids) - 1)
            sampled_ids.append(row.request_id)
    shapes = [RowShape(row.start, row.num_new_tokens, tables.blocks[row.request_id]) for row in rows]
    ragged = kernels.ragged_kernel is not None
    bucket = _decode_bucket(shapes, kernels) if ragged else None
    num_padding = 0 if bucket is None else bucket - len(shapes)
    token_ids.extend([0] * num_padding)
    positions.extend([0] * num_padding)
    segments = [token_ids, positions]
    if ragged:
        segments += _ragged_segments(shapes, tables, rows, kernels, num_padding)
    num_read = len(segments)  # what the forward pass reads; what follows is applied before it
    fill_places, fill_sources = ([list(column) for column in zip(*fills)] if fills else [[], []])
    table_slots, table_columns, table_blocks = ([list(column) for column in zip(*writes)] if writes else [[], [], []])
    segments += [sample_index, fill_places, fill_sources, table_slots, table_columns, table_blocks]
    flat = uploader.upload(_padded(segments))
    parts = _unpadded(flat, [len(segment) for segment in segments])
    sample_t, fill_places, fill_sources, table_slots, table_columns, table_blocks = parts[num_read:]
    token_ids_t, positions_t = parts[:2]
    if fills:
        token_ids_t[fill_places.long()] = before.tokens[fill_sources.long()].to(torch.int32)
    if writes:
        tables.table[table_slots.long(), table_columns.long()] = table_blocks
    if ragged:
        attention = _ragged_batch(parts[2:num_read], tables, shapes, kernels, bucket)
    else:
        attention = build_attention_batch(shapes, kernels.block_size, kernels.head_dim, flat.device,
                                          kernels.decode_kernel, kernels.dtype)
    scoring = None
    if spans:  # rare (echo), and read by no captured graph: a copy of its own
        places_t, targets_t = torch.tensor([score_places, score_targets], dtype=torch.int32).to(flat.device)
        scoring = PromptScoring(places_t, targets_t, spans, max(span[3] for span in spans))
    return StepInputs(token_ids_t, positions_t, sample_t, attention, sampled_ids, scoring)


def _decode_bucket(shapes: list[RowShape], kernels: AttentionKernels) -> int | None:
    """The bucket a decode step is padded to; None for other steps, or past the largest bucket."""
    if not kernels.decode_buckets or any(shape.num_new != 1 for shape in shapes):
        return None
    return bucket_for(len(shapes), kernels.decode_buckets)


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
        start += padded_length(length)
    return parts


def _ragged_segments(shapes: list[RowShape], tables: BlockTables, rows: list[StepRow], kernels: AttentionKernels,
                     num_padding: int) -> list[list[int]]:
    """Where each new token's k/v goes, each row's first token and context, its table slot, and
    the step's query tiles; padding rows (one token each) write and read the padding block only."""
    block_size = kernels.block_size
    write_blocks: list[int] = []
    write_offsets: list[int] = []
    for shape in shapes:
        for position in range(shape.start, shape.start + shape.num_new):
            write_blocks.append(shape.block_ids[position // block_size])
            write_offsets.append(position % block_size)
    write_blocks.extend([tables.bounds.padding_block] * num_padding)
    write_offsets.extend([0] * num_padding)
    lengths = [shape.num_new for shape in shapes] + [1] * num_padding
    starts = [0, *itertools.accumulate(lengths)]
    contexts = [shape.start + shape.num_new for shape in shapes] + [1] * num_padding
    slots = [tables.slots[row.request_id] for row in rows] + [tables.padding_slot] * num_padding
    tile = tile_tokens(starts[-1], len(lengths), kernels.group)
    tile_rows, tile_firsts, tile_sizes = tile_map(lengths, tile)
    return [write_blocks, write_offsets, starts, contexts, slots, tile_rows, tile_firsts, tile_sizes]


def _ragged_batch(parts: list[torch.Tensor], tables: BlockTables, shapes: list[RowShape],
                  kernels: AttentionKernels, bucket: int | None) -> AttentionBatch:
    """The kernel's view of the step. A decode step of a bucket gathers every column of its rows'
    tables into the fixed step table, so the table's address and shape (and the kernel's split
    count, which follows from the shape) are the bucket's alone."""
    write_blocks, write_offsets, starts, contexts, slots, tile_rows, tile_firsts, tile_sizes = parts
    num_rows = len(shapes) if bucket is None else bucket
    width = None if bucket is not None else max(-(-(shape.start + shape.num_new) // kernels.block_size)
                                                for shape in shapes)
    block_table = tables.gather(slots, width)  # [rows, width or every column]
    tiles = AttentionTiles(tile_rows, tile_firsts, tile_sizes, tile_tokens(write_blocks.shape[0], num_rows,
                                                                          kernels.group))
    return AttentionBatch(
        write_blocks=write_blocks, write_offsets=write_offsets, decode=None, prefills=[],
        scale=kernels.head_dim**-0.5, ragged=RaggedRows(starts, contexts, block_table, tiles),
        ragged_kernel=kernels.ragged_kernel, kv_writer=kernels.kv_writer,
    )
