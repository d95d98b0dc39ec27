"""Paged attention in Triton for GPUs: ragged rows of new tokens, each attending causally over its
own paged cache, one KV head's whole query group per program, long contexts split across programs;
and the write of a step's new keys and values into the cache, both in one launch.

Nothing that changes from step to step is specialised on (token and tile counts, the block table's
width, the metadata's offsets in the step's upload), so a run compiles each kernel once per tile
shape and split mode, at start-up (`warm_up`), never in the middle of a run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seesaw.model.attention import PREFILL_LINES, AttentionTiles, tile_tokens

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 16
_TOKENS_PER_SPLIT = 512  # splits at least this long, so the combine stays cheap next to them (untuned)
_ENOUGH_PROGRAMS = 256  # with this many (tile, kv head) programs a GPU is busy without splitting (untuned)
_LOG2_E = 1.4426950408889634


def paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    row_starts: torch.Tensor,  # [num_rows + 1] int32, each row's first token in q
    row_contexts: torch.Tensor,  # [num_rows] int32, cached plus new tokens
    block_table: torch.Tensor,  # [num_rows, max_blocks] int32
    scale: float,
    num_splits: int | None = None,
    tiles: AttentionTiles | None = None,
) -> torch.Tensor:
    """Each row's new tokens attend causally over the row's context, which the cache already holds
    in full (new tokens included). Returns [num_tokens, num_heads, head_dim] in q's dtype; any
    `num_splits` (programs sharing one row's context) gives the same result up to rounding.
    `tiles`: the step's tile map, built once per step; without it, it is worked out here."""
    _check_tensors(q, k_cache, v_cache)
    _check_metadata(q, row_starts, row_contexts, block_table)
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    group_padded = triton.next_power_of_2(group)
    if tiles is None:
        tile = tile_tokens(num_tokens, row_contexts.shape[0], group)
        tiles = AttentionTiles(*_tile_map(row_starts, num_tokens, tile), tile)
    tile_rows, tile_firsts, tile_sizes, tile = tiles
    num_tiles = tile_rows.shape[0]
    if num_splits is None:
        num_splits = _default_num_splits(block_table.shape[1] * block_size, num_tiles * num_kv_heads)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    is_split = num_splits > 1
    partial_max, partial_sum, partial_acc = _partials(q, num_splits) if is_split else (out, out, out)
    _attend_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, partial_acc, partial_max, partial_sum,
        row_starts, row_contexts, block_table, tile_rows, tile_firsts, tile_sizes,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
        num_tokens, num_heads, scale * _LOG2_E, num_splits,
        GROUP=group, GROUP_PADDED=group_padded, TILE=tile, BLOCK=block_size, HEAD_DIM=head_dim,
        IS_SPLIT=is_split, PRECISION="ieee" if q.dtype == torch.float32 else None,  # no tf32 for fp32 inputs
    )
    if is_split:
        _combine_kernel[(num_tokens, num_heads)](
            out, partial_max, partial_sum, partial_acc, num_tokens, num_heads, num_splits,
            SPLITS_PADDED=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        )
    return out


def _partials(q: torch.Tensor, num_splits: int):
    """Each split's running max, sum and unnormalized output, in fp32."""
    num_tokens, num_heads, head_dim = q.shape
    partial_max = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)  # [num_splits, num_tokens, num_heads]
    partial_acc = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    return partial_max, partial_sum, partial_acc


def _check_tensors(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3 or q.dtype not in _DTYPES:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim] in fp16/bf16/fp32, "
                         f"got {tuple(q.shape)} {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"{name} must be [num_blocks, num_kv_heads, block_size, head_dim] in q's dtype "
                             f"on q's device, got {tuple(cache.shape)} {cache.dtype} on {cache.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    _, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, cache_dim = k_cache.shape
    if cache_dim != head_dim or not _is_power_of_two(head_dim) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 shared by q and k_cache, "
                         f"got {head_dim} and {cache_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads are not a multiple of k_cache's {num_kv_heads} kv heads")
    if not _is_power_of_two(block_size) or block_size < 16:
        raise ValueError(f"k_cache's block_size must be a power of two >= 16, got {block_size}")


def _check_metadata(q: torch.Tensor, row_starts, row_contexts, block_table) -> None:
    expected = (("row_starts", row_starts, 1), ("row_contexts", row_contexts, 1), ("block_table", block_table, 2))
    for name, tensor, dims in expected:
        if tensor.dtype != torch.int32 or tensor.dim() != dims or tensor.device != q.device:
            raise ValueError(f"{name} must be a {dims}-d int32 tensor on q's device, "
                             f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    num_rows = row_contexts.shape[0]
    if row_starts.shape[0] != num_rows + 1 or not row_starts.is_contiguous():
        raise ValueError(f"row_starts must be contiguous [num_rows + 1] = [{num_rows + 1}], "
                         f"got {tuple(row_starts.shape)}")
    if block_table.shape[0] != num_rows or block_table.shape[1] == 0:
        raise ValueError(f"block_table must be [num_rows, max_blocks] with num_rows {num_rows}, "
                         f"got {tuple(block_table.shape)}")
    if not row_contexts.is_contiguous():
        raise ValueError("row_contexts must be contiguous")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _tile_map(row_starts: torch.Tensor, num_tokens: int, tile: int):
    """Each tile's row, first token in q and number of tokens, computed on the device without a sync.
    The grid is an upper bound on the tile count; tiles past the real ones have no tokens."""
    lengths = row_starts[1:] - row_starts[:-1]  # [num_rows]
    counts = (lengths + tile - 1) // tile  # [num_rows] tiles per row
    ends = counts.cumsum(0, dtype=torch.int32)  # [num_rows]
    num_rows = lengths.shape[0]
    bound = max(1, min(num_tokens, -(-num_tokens // tile) + num_rows))
    index = torch.arange(bound, dtype=torch.int32, device=row_starts.device)  # [bound]
    rows = torch.searchsorted(ends, index, right=True, out_int32=True).clamp_(max=max(num_rows - 1, 0))  # [bound]
    if num_rows == 0:
        return rows, index * 0, index * 0
    within = index - (ends - counts)[rows]  # [bound] tile index inside its row
    firsts = row_starts[rows] + within * tile  # [bound]
    sizes = (lengths[rows] - within * tile).clamp_(0, tile)  # [bound]
    return rows, firsts.to(torch.int32), sizes.to(torch.int32)


def _default_num_splits(max_context: int, num_programs: int) -> int:
    if num_programs >= _ENOUGH_PROGRAMS:
        return 1
    return max(1, min(_MAX_SPLITS, max_context // _TOKENS_PER_SPLIT))


_METADATA = ["row_starts_ptr", "row_contexts_ptr", "table_ptr", "tile_rows_ptr", "tile_firsts_ptr", "tile_sizes_ptr"]


@triton.jit(do_not_specialize=["stride_table_row", "num_tokens", "num_splits"],
            do_not_specialize_on_alignment=_METADATA)
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, max_ptr, sum_ptr,
    row_starts_ptr, row_contexts_ptr, table_ptr, tile_rows_ptr, tile_firsts_ptr, tile_sizes_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_table_row, stride_table_block,
    num_tokens, num_heads, qk_scale, num_splits,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr, IS_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: a tile of one row's query tokens, all query heads of one KV head, one split of
    the row's blocks. A line of the tile is one (token, head) pair: line // GROUP_PADDED is the token."""
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(tile_rows_ptr + tile)
    first = tl.load(tile_firsts_ptr + tile)
    size = tl.load(tile_sizes_ptr + tile)
    row_start = tl.load(row_starts_ptr + row)
    context = tl.load(row_contexts_ptr + row)
    first_position = context - (tl.load(row_starts_ptr + row + 1) - row_start) + first - row_start
    lines = tl.arange(0, TILE * GROUP_PADDED)
    tokens = (first + lines // GROUP_PADDED).to(tl.int64)  # [LINES] index in q
    heads = kv_head * GROUP + lines % GROUP_PADDED  # [LINES]
    is_line = (lines // GROUP_PADDED < size) & (lines % GROUP_PADDED < GROUP)  # [LINES]
    positions = tl.minimum(first_position + lines // GROUP_PADDED, context - 1)  # [LINES] last key seen
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=is_line[:, None], other=0.0)  # [LINES, HEAD_DIM]
    num_blocks = tl.cdiv(context, BLOCK)
    per_split = tl.cdiv(num_blocks, num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, (first_position + size - 1) // BLOCK + 1)  # skip blocks past the tile
    hi = tl.where(size > 0, hi, 0)
    m_i = tl.full([TILE * GROUP_PADDED], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE * GROUP_PADDED], tl.float32)
    acc = tl.zeros([TILE * GROUP_PADDED, HEAD_DIM], tl.float32)
    offsets = tl.arange(0, BLOCK)
    for block in range(lo, hi):
        block_id = tl.load(table_ptr + row * stride_table_row + block * stride_table_block).to(tl.int64)
        key_positions = block * BLOCK + offsets  # [BLOCK]
        is_key = (key_positions < context)[:, None]
        keys = tl.load(k_ptr + block_id * stride_kb + kv_head * stride_kh + offsets[:, None] * stride_kt
                       + dims[None, :] * stride_kd, mask=is_key, other=0.0)  # [BLOCK, HEAD_DIM]
        values = tl.load(v_ptr + block_id * stride_vb + kv_head * stride_vh + offsets[:, None] * stride_vt
                         + dims[None, :] * stride_vd, mask=is_key, other=0.0)  # [BLOCK, HEAD_DIM]
        acc, m_i, l_i = _online_softmax_step(q, keys, values, acc, m_i, l_i, key_positions, positions,
                                             qk_scale, PRECISION)
    _store_tile(out_ptr, max_ptr, sum_ptr, acc, m_i, l_i, tokens, heads, is_line, dims, split,
                num_tokens, num_heads, HEAD_DIM, IS_SPLIT)


@triton.jit
def _online_softmax_step(q, keys, values, acc, m_i, l_i, key_positions, positions, qk_scale,
                         PRECISION: tl.constexpr):
    """Fold one block of keys into the running max, sum and accumulator (base-2 exponents)."""
    scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * qk_scale  # [LINES, BLOCK]
    scores = tl.where(key_positions[None, :] <= positions[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # [LINES]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a line that has seen nothing yet stays at zero
    p = tl.exp2(scores - m_safe[:, None])  # [LINES, BLOCK]
    alpha = tl.exp2(m_i - m_safe)  # [LINES]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_tile(out_ptr, max_ptr, sum_ptr, acc, m_i, l_i, tokens, heads, is_line, dims, split,
                num_tokens, num_heads, HEAD_DIM: tl.constexpr, IS_SPLIT: tl.constexpr):
    """Normalized output without a split; otherwise this split's max, sum and unnormalized acc."""
    if IS_SPLIT:
        line = (split * num_tokens + tokens) * num_heads + heads  # [LINES] into [splits, tokens, heads]
        tl.store(max_ptr + line, m_i, mask=is_line)
        tl.store(sum_ptr + line, l_i, mask=is_line)
        tl.store(out_ptr + line[:, None] * HEAD_DIM + dims[None, :], acc, mask=is_line[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # [LINES, HEAD_DIM]
        line = tokens * num_heads + heads
        tl.store(out_ptr + line[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=is_line[:, None])


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _combine_kernel(out_ptr, max_ptr, sum_ptr, acc_ptr, num_tokens, num_heads, num_splits,
                    SPLITS_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (token, head): rescale each split's partial result to the common max and normalize."""
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PADDED)
    dims = tl.arange(0, HEAD_DIM)
    is_split = splits < num_splits
    line = (splits * num_tokens + token) * num_heads + head  # [SPLITS_PADDED]
    m = tl.load(max_ptr + line, mask=is_split, other=float("-inf"))
    total = tl.load(sum_ptr + line, mask=is_split, other=0.0)
    acc = tl.load(acc_ptr + line[:, None] * HEAD_DIM + dims[None, :], mask=is_split[:, None], other=0.0)
    weights = tl.exp2(m - tl.max(m, 0))  # [SPLITS_PADDED]; empty splits (max -inf) weigh nothing
    out = tl.sum(weights[:, None] * acc, 0) / tl.sum(weights * total, 0)  # [HEAD_DIM]
    tl.store(out_ptr + (token * num_heads + head) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def write_kv_triton(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    write_blocks: torch.Tensor,  # [num_tokens] int32: the block each token's k/v goes to
    write_offsets: torch.Tensor,  # [num_tokens] int32: its slot in that block
) -> None:
    """Write every new token's keys and values into the paged cache, in one launch."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError(f"k and v must be [num_tokens, num_kv_heads, head_dim] with contiguous last dims, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if write_blocks.dtype != torch.int32 or write_offsets.dtype != torch.int32:
        raise ValueError("write_blocks and write_offsets must be int32")
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, write_blocks, write_offsets,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], num_kv_heads,
        HEADS_PADDED=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
    )


@triton.jit(do_not_specialize_on_alignment=["blocks_ptr", "offsets_ptr"])
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, blocks_ptr, offsets_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kb, stride_kch, stride_kct, stride_vb, stride_vch, stride_vct, num_kv_heads,
                     HEADS_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One token: its keys and values for every KV head, into its block's slot."""
    token = tl.program_id(0).to(tl.int64)
    block = tl.load(blocks_ptr + token).to(tl.int64)
    slot = tl.load(offsets_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PADDED)
    dims = tl.arange(0, HEAD_DIM)
    is_head = (heads < num_kv_heads)[:, None]
    keys = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=is_head)
    values = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=is_head)
    tl.store(k_cache_ptr + block * stride_kb + heads[:, None] * stride_kch + slot * stride_kct + dims[None, :],
             keys, mask=is_head)
    tl.store(v_cache_ptr + block * stride_vb + heads[:, None] * stride_vch + slot * stride_vct + dims[None, :],
             values, mask=is_head)


def warm_up(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Compile every variant a run launches (decode and prefill tiles, with and without splits, each
    combine width) on a tiny step, so no compile lands in the middle of a run."""
    q = torch.zeros(2 * PREFILL_LINES, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.zeros(q.shape[0], num_kv_heads, head_dim, dtype=dtype, device=device)
    cache = torch.zeros(2, num_kv_heads, block_size, head_dim, dtype=dtype, device=device)
    index = torch.zeros(q.shape[0], dtype=torch.int32, device=device)
    write_kv_triton(k, k, cache, cache, index, index)
    contexts = torch.ones(1, dtype=torch.int32, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    for num_tokens in (1, q.shape[0]):  # a decode tile, a prefill tile
        starts = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
        for num_splits in (1, 2, 3, 5, 9):  # no split, then each power-of-two combine width
            if num_splits <= _MAX_SPLITS:
                paged_attention_triton(q[:num_tokens], cache, cache, starts, contexts.fill_(num_tokens),
                                       table.expand(1, -(-num_tokens // block_size)).contiguous(), 1.0,
                                       num_splits=num_splits)
