"""Paged attention: per-step metadata built once, and the reference torch backend used per layer."""

from __future__ import annotations

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
    slots: torch.Tensor  # [num_rows, max_context] cache slots, padding points at slot 0
    lengths: torch.Tensor  # [num_rows] context length of each row
    bias: torch.Tensor | None  # [num_rows, 1, 1, max_context] 0 where attended, -inf on padding; None with a kernel
    max_context: int


@dataclass
class PrefillRow:
    """A run of new tokens of one request; `slots` and `bias` only when earlier context exists."""

    start: int  # first token of the run in the flat step
    end: int
    slots: torch.Tensor | None  # [context] cache slots of the whole context, new tokens included
    bias: torch.Tensor | None  # [1, 1, num_new, context] causal mask aligned to the last token


@dataclass
class AttentionBatch:
    """Everything the attention layers need for one step, shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot written by each new token
    decode: DecodeGroup | None
    prefills: list[PrefillRow]
    scale: float
    decode_kernel: PagedDecode | None = None  # reads the cache in place; None: gather, then attend


def build_attention_batch(
    rows: list[RowShape], block_size: int, head_dim: int, device: torch.device | str,
    decode_kernel: PagedDecode | None = None, dtype: torch.dtype = torch.float32,
) -> AttentionBatch:
    """Metadata for a step whose flat token list is the rows' new tokens, in row order; masks
    are built in `dtype`, the queries' dtype."""
    slot_mapping: list[int] = []
    decode_rows: list[tuple[int, RowShape]] = []
    prefills: list[PrefillRow] = []
    offset = 0
    for row in rows:
        slot_mapping.extend(_slots(row.block_ids, row.start, row.start + row.num_new, block_size))
        if row.num_new == 1 and row.start > 0:
            decode_rows.append((offset, row))
        else:
            prefills.append(_prefill_row(row, offset, block_size, device, dtype))
        offset += row.num_new
    return AttentionBatch(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        decode=_decode_group(decode_rows, block_size, device, dtype, decode_kernel is None) if decode_rows else None,
        prefills=prefills,
        scale=head_dim**-0.5,
        decode_kernel=decode_kernel,
    )


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _prefill_row(row: RowShape, offset: int, block_size: int, device, dtype: torch.dtype) -> PrefillRow:
    end = offset + row.num_new
    if row.start == 0:
        return PrefillRow(offset, end, None, None)
    context = row.start + row.num_new
    slots = torch.tensor(_slots(row.block_ids, 0, context, block_size), dtype=torch.long, device=device)
    # New token i sits at position start + i and sees positions 0 .. start + i.
    visible = torch.arange(context, device=device)[None, :] <= (
        torch.arange(row.num_new, device=device)[:, None] + row.start
    )
    bias = torch.zeros(row.num_new, context, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return PrefillRow(offset, end, slots, bias[None, None])


def _decode_group(
    decode_rows: list[tuple[int, RowShape]], block_size: int, device, dtype: torch.dtype, needs_bias: bool,
) -> DecodeGroup:
    contexts = [row.start + 1 for _, row in decode_rows]
    max_context = -(-max(contexts) // block_size) * block_size
    slots = torch.zeros(len(decode_rows), max_context, dtype=torch.long)
    for index, (_, row) in enumerate(decode_rows):
        blocks = torch.tensor(row.block_ids[: max_context // block_size], dtype=torch.long)
        row_slots = (blocks[:, None] * block_size + torch.arange(block_size)).view(-1)
        slots[index, : row_slots.numel()] = row_slots
    lengths = torch.tensor(contexts, dtype=torch.long)
    bias = None
    if needs_bias:
        bias = torch.zeros(len(decode_rows), max_context, dtype=dtype)
        bias.masked_fill_(torch.arange(max_context)[None, :] >= lengths[:, None], float("-inf"))
        bias = bias[:, None, None, :].to(device)
    return DecodeGroup(
        token_index=torch.tensor([offset for offset, _ in decode_rows], dtype=torch.long, device=device),
        slots=slots.to(device),
        lengths=lengths.to(device),
        bias=bias,
        max_context=max_context,
    )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    batch: AttentionBatch,
) -> torch.Tensor:
    """Write the new k/v into the cache, then attend each token over its request's context."""
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
    if batch.decode is not None:
        group = batch.decode
        queries = q.index_select(0, group.token_index)  # [rows, heads, hd]
        if batch.decode_kernel is not None:
            decoded = batch.decode_kernel(queries, k_cache, v_cache, group.slots, group.lengths, batch.scale)
        else:
            decoded = _decode(queries, k_cache, v_cache, group, batch.scale)
        out[group.token_index] = decoded
    for row in batch.prefills:
        out[row.start : row.end] = _prefill(q, k, v, k_cache, v_cache, row, batch.scale)
    return out


def _decode(queries, k_cache, v_cache, group: DecodeGroup, scale: float) -> torch.Tensor:
    """Attention of `queries` [rows, heads, hd] over their gathered, padded contexts."""
    num_rows = group.token_index.numel()
    kv_shape = (num_rows, group.max_context, k_cache.shape[1], k_cache.shape[2])
    slots = group.slots.view(-1)
    keys = k_cache.index_select(0, slots).view(kv_shape).transpose(1, 2)  # [rows, kv_heads, ctx, hd]
    values = v_cache.index_select(0, slots).view(kv_shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries[:, :, None, :], keys, values, attn_mask=group.bias, scale=scale, enable_gqa=True
    )  # [rows, heads, 1, hd]
    return out[:, :, 0, :]  # [rows, heads, hd]


def _prefill(q, k, v, k_cache, v_cache, row: PrefillRow, scale: float) -> torch.Tensor:
    queries = q[row.start : row.end].transpose(0, 1)[None]  # [1, heads, new, hd]
    if row.slots is None:
        keys = k[row.start : row.end].transpose(0, 1)[None]  # [1, kv_heads, new, hd]
        values = v[row.start : row.end].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        keys = k_cache.index_select(0, row.slots).transpose(0, 1)[None]  # [1, kv_heads, ctx, hd]
        values = v_cache.index_select(0, row.slots).transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=row.bias, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [new, heads, hd]
