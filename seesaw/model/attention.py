"""Paged attention: per-step metadata built once, and the reference torch backend used per layer.

A layer's cache is [num_blocks, kv_heads, block_size, head_dim]: each block holds its tokens
heads-major, and blocks need not be adjacent in memory (a worker's blocks are pages of a larger
arena that several layouts share), so the cache is addressed by (block, offset), never by a flat slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from seesaw.model.cpu_kernels import PagedDecode


class RowShape(NamedTuple):
    """One request's part of a step: `num_new` tokens appended after `start` cached ones."""

    start: int
    num_new: int
    block_ids: list[int]


@dataclass
class DecodeGroup:
    """Rows with one new token each, attended together over a padded context."""

    token_index: torch.Tensor  # [num_rows] positions of the rows' tokens in the flat step
    block_table: torch.Tensor  # [num_rows, max_blocks] each row's blocks, padding points at block 0
    lengths: torch.Tensor  # [num_rows] context length of each row
    bias: torch.Tensor | None  # [num_rows, 1, 1, max_context] 0 where attended, -inf on padding; None with a kernel
    max_context: int


@dataclass
class PrefillRow:
    """A run of new tokens of one request; `blocks` and `bias` only when earlier context exists."""

    start: int  # first token of the run in the flat step
    end: int
    context: int  # cached plus new tokens
    blocks: torch.Tensor | None  # [blocks] holding the whole context, new tokens included
    bias: torch.Tensor | None  # [1, 1, num_new, context] causal mask aligned to the last token


DECODE_LINES = 16  # query lines (token x head) per tile when rows are mostly single tokens: tl.dot's minimum
PREFILL_LINES = 64


class AttentionTiles(NamedTuple):
    """A step's query tiles for a ragged kernel, worked out once per step for every layer: each
    tile's row, first token and number of tokens, and the tokens per tile."""

    rows: torch.Tensor  # [num_tiles] int32
    firsts: torch.Tensor  # [num_tiles] int32
    sizes: torch.Tensor  # [num_tiles] int32
    tile: int


def tile_tokens(num_tokens: int, num_rows: int, group: int) -> int:
    """Query tokens per tile: few when rows are mostly decodes (one token each), more for prefill;
    `group` query heads share each KV head, and a tile holds tokens x (group padded to a power of 2)."""
    lines = DECODE_LINES if num_tokens <= 2 * num_rows else PREFILL_LINES
    return max(1, lines // (1 << max(0, group - 1).bit_length()))


def tile_map(row_lengths: list[int], tile: int) -> tuple[list[int], list[int], list[int]]:
    """Each tile's row, first token and size, for rows of `row_lengths` new tokens."""
    rows, firsts, sizes = [], [], []
    first = 0
    for row, length in enumerate(row_lengths):
        for offset in range(0, length, tile):
            rows.append(row)
            firsts.append(first + offset)
            sizes.append(min(tile, length - offset))
        first += length
    return rows, firsts, sizes


@dataclass
class RaggedRows:
    """Every row of a step for a kernel that reads the paged cache in place, in one launch."""

    row_starts: torch.Tensor  # [num_rows + 1] int32 each row's first token in the flat step
    row_contexts: torch.Tensor  # [num_rows] int32 cached plus new tokens
    block_table: torch.Tensor  # [num_rows, max_blocks] int32, padding points at block 0
    tiles: AttentionTiles | None = None  # the step's query tiles; None: the kernel works them out


# (q, k_cache, v_cache, row_starts, row_contexts, block_table, scale, tiles=) -> out: seesaw.model.triton_attention
RaggedKernel = Callable[..., torch.Tensor]
# (k, v, k_cache, v_cache, write_blocks, write_offsets) -> None: writes the step's new k/v in one launch
KVWriter = Callable[..., None]


@dataclass
class AttentionBatch:
    """Everything the attention layers need for one step, shared by all layers."""

    write_blocks: torch.Tensor  # [num_tokens] the block each new token's k/v goes to
    write_offsets: torch.Tensor  # [num_tokens] its place in that block
    decode: DecodeGroup | None
    prefills: list[PrefillRow]
    scale: float
    decode_kernel: PagedDecode | None = None  # reads the cache in place; None: gather, then attend
    ragged: RaggedRows | None = None  # set with a ragged kernel, which then attends every row
    ragged_kernel: RaggedKernel | None = None
    kv_writer: KVWriter | None = None  # writes the new k/v into the cache; None: torch indexing


def build_attention_batch(
    rows: list[RowShape], block_size: int, head_dim: int, device: torch.device | str,
    decode_kernel: PagedDecode | None = None, dtype: torch.dtype = torch.float32,
) -> AttentionBatch:
    """Metadata for the torch path, for a step whose flat token list is the rows' new tokens, in
    row order; masks are built in `dtype`, the queries' dtype. (A ragged kernel's metadata is
    built with the step's other inputs: seesaw.runtime.step_inputs.)"""
    write_blocks: list[int] = []
    write_offsets: list[int] = []
    decode_rows: list[tuple[int, RowShape]] = []
    prefills: list[PrefillRow] = []
    offset = 0
    for row in rows:
        for position in range(row.start, row.start + row.num_new):
            write_blocks.append(row.block_ids[position // block_size])
            write_offsets.append(position % block_size)
        if row.num_new == 1 and row.start > 0:
            decode_rows.append((offset, row))
        else:
            prefills.append(_prefill_row(row, offset, block_size, device, dtype))
        offset += row.num_new
    return AttentionBatch(
        write_blocks=torch.tensor(write_blocks, dtype=torch.long, device=device),
        write_offsets=torch.tensor(write_offsets, dtype=torch.long, device=device),
        decode=_decode_group(decode_rows, block_size, device, dtype, decode_kernel is None) if decode_rows else None,
        prefills=prefills,
        scale=head_dim**-0.5,
        decode_kernel=decode_kernel,
    )


def _prefill_row(row: RowShape, offset: int, block_size: int, device, dtype: torch.dtype) -> PrefillRow:
    end = offset + row.num_new
    context = row.start + row.num_new
    if row.start == 0:
        return PrefillRow(offset, end, context, None, None)
    num_blocks = -(-context // block_size)
    blocks = torch.tensor(row.block_ids[:num_blocks], dtype=torch.long, device=device)
    # New token i sits at position start + i and sees positions 0 .. start + i.
    visible = torch.arange(context, device=device)[None, :] <= (
        torch.arange(row.num_new, device=device)[:, None] + row.start
    )
    bias = torch.zeros(row.num_new, context, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return PrefillRow(offset, end, context, blocks, bias[None, None])


def _decode_group(
    decode_rows: list[tuple[int, RowShape]], block_size: int, device, dtype: torch.dtype, needs_bias: bool,
) -> DecodeGroup:
    contexts = [row.start + 1 for _, row in decode_rows]
    max_blocks = -(-max(contexts) // block_size)
    table = torch.zeros(len(decode_rows), max_blocks, dtype=torch.long)
    for index, (_, row) in enumerate(decode_rows):
        blocks = row.block_ids[: -(-contexts[index] // block_size)]
        table[index, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    lengths = torch.tensor(contexts, dtype=torch.long)
    max_context = max_blocks * block_size
    bias = None
    if needs_bias:
        bias = torch.zeros(len(decode_rows), max_context, dtype=dtype)
        bias.masked_fill_(torch.arange(max_context)[None, :] >= lengths[:, None], float("-inf"))
        bias = bias[:, None, None, :].to(device)
    return DecodeGroup(
        token_index=torch.tensor([offset for offset, _ in decode_rows], dtype=torch.long, device=device),
        block_table=table.to(device),
        lengths=lengths.to(device),
        bias=bias,
        max_context=max_context,
    )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    batch: AttentionBatch,
) -> torch.Tensor:
    """Write the new k/v into the cache, then attend each token over its request's context."""
    if batch.kv_writer is not None:
        batch.kv_writer(k, v, k_cache, v_cache, batch.write_blocks, batch.write_offsets)
    else:
        k_cache[batch.write_blocks, :, batch.write_offsets] = k
        v_cache[batch.write_blocks, :, batch.write_offsets] = v
    if batch.ragged is not None:
        rows = batch.ragged
        return batch.ragged_kernel(q, k_cache, v_cache, rows.row_starts, rows.row_contexts, rows.block_table,
                                   batch.scale, tiles=rows.tiles)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, num_heads, head_dim]
    if batch.decode is not None:
        group = batch.decode
        queries = q.index_select(0, group.token_index)  # [rows, heads, hd]
        if batch.decode_kernel is not None:
            decoded = batch.decode_kernel(queries, k_cache, v_cache, group.block_table, group.lengths, batch.scale)
        else:
            decoded = _decode(queries, k_cache, v_cache, group, batch.scale)
        out[group.token_index] = decoded
    for row in batch.prefills:
        out[row.start : row.end] = _prefill(q, k, v, k_cache, v_cache, row, batch.scale)
    return out


def gather_context(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The cached tokens of `blocks` ([..., n]) in order: [..., kv_heads, n * block_size, head_dim]."""
    gathered = cache[blocks]  # [..., n, kv_heads, block_size, head_dim]
    *lead, n, heads, block_size, head_dim = gathered.shape
    gathered = gathered.movedim(-4, -3)  # [..., kv_heads, n, block_size, head_dim]
    return gathered.reshape(*lead, heads, n * block_size, head_dim)


def _decode(queries, k_cache, v_cache, group: DecodeGroup, scale: float) -> torch.Tensor:
    """Attention of `queries` [rows, heads, hd] over their gathered, padded contexts."""
    keys = gather_context(k_cache, group.block_table)  # [rows, kv_heads, max_context, hd]
    values = gather_context(v_cache, group.block_table)
    out = F.scaled_dot_product_attention(
        queries[:, :, None, :], keys, values, attn_mask=group.bias, scale=scale, enable_gqa=True
    )  # [rows, heads, 1, hd]
    return out[:, :, 0, :]  # [rows, heads, hd]


def _prefill(q, k, v, k_cache, v_cache, row: PrefillRow, scale: float) -> torch.Tensor:
    queries = q[row.start : row.end].transpose(0, 1)[None]  # [1, heads, new, hd]
    if row.blocks is None:
        keys = k[row.start : row.end].transpose(0, 1)[None]  # [1, kv_heads, new, hd]
        values = v[row.start : row.end].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        keys = gather_context(k_cache, row.blocks)[None, :, : row.context]  # [1, kv_heads, ctx, hd]
        values = gather_context(v_cache, row.blocks)[None, :, : row.context]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=row.bias, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [new, heads, hd]
