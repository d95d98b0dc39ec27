"""Paged attention: the CPU decode kernel and the torch path agree with plain causal attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seesaw.model.attention import RowShape, build_attention_batch, paged_attention
from seesaw.model.cpu_kernels import load_paged_decode

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4


def _dense(q, k, v):
    """Attention of one request's queries over its whole context, the last queries being the newest."""
    offset = k.shape[0] - q.shape[0]
    mask = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_mixed_step_matches_dense_attention(use_kernel):
    kernel = load_paged_decode() if use_kernel else None
    if use_kernel and kernel is None:
        pytest.skip("the CPU kernel cannot be built here")
    generator = torch.Generator().manual_seed(0)
    # Blocks are pages of a larger arena: [blocks, layers, 2, kv_heads, block, dim], one layer used.
    pages = torch.randn(64, 3, 2, KV_HEADS, BLOCK, DIM, generator=generator)
    k_cache, v_cache = pages[:, 1, 0], pages[:, 1, 1]  # [blocks, kv_heads, block, dim], strided
    # (cached tokens, new tokens, blocks): two decodes, a fresh prompt, a later prefill chunk.
    rows = [RowShape(9, 1, [5, 9, 2]), RowShape(3, 1, [7]), RowShape(0, 6, [11, 12]), RowShape(5, 3, [20, 21])]
    num_new = sum(r.num_new for r in rows)
    q = torch.randn(num_new, HEADS, DIM, generator=generator)
    k = torch.randn(num_new, KV_HEADS, DIM, generator=generator)
    v = torch.randn(num_new, KV_HEADS, DIM, generator=generator)
    batch = build_attention_batch(rows, BLOCK, DIM, "cpu", kernel)
    out = paged_attention(q, k, v, k_cache, v_cache, batch)
    offset = 0
    for row in rows:
        blocks = [row.block_ids[p // BLOCK] for p in range(row.start + row.num_new)]
        places = [p % BLOCK for p in range(row.start + row.num_new)]
        expected = _dense(q[offset : offset + row.num_new], k_cache[blocks, :, places], v_cache[blocks, :, places])
        torch.testing.assert_close(out[offset : offset + row.num_new], expected, atol=1e-5, rtol=1e-5)
        offset += row.num_new


def test_a_lock_left_by_a_killed_kernel_build_does_not_hang_the_next_start(tmp_path, monkeypatch):
    import os

    from torch.utils.cpp_extension import _get_build_directory

    from seesaw.model.cpu_kernels import STALE_LOCK_S, _remove_stale_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = Path(_get_build_directory("seesaw_test_kernel", verbose=False)) / "lock"
    lock.touch()
    _remove_stale_lock("seesaw_test_kernel")
    assert lock.exists()  # a build may be running right now
    os.utime(lock, (lock.stat().st_atime, lock.stat().st_mtime - STALE_LOCK_S - 1))
    _remove_stale_lock("seesaw_test_kernel")
    assert not lock.exists()
