"""The Triton paged-attention kernels, run by Triton's CPU interpreter, agree with the torch reference."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: run the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; tests/test_gpu.py runs the kernel on the GPU")

pytest.importorskip("triton")

from seesaw.model.attention import RowShape, build_attention_batch, paged_attention  # noqa: E402
from seesaw.model.triton_attention import paged_attention_triton  # noqa: E402
from seesaw.runtime.step_inputs import AttentionKernels, BlockTables, Uploader, build_step_inputs  # noqa: E402
from seesaw.step import StepRow  # noqa: E402
from helpers import ragged_attention_batch  # noqa: E402

BLOCK, KV_HEADS, NUM_BLOCKS = 16, 2, 24

# (cached tokens, new tokens): decodes whose context ends at a block boundary and one past it, a fresh
# prompt, and two later prefill chunks (the first spans two query tiles when 3 or 4 heads share a KV head).
MIXED_ROWS = [(15, 1), (16, 1), (0, 5), (13, 19), (10, 7)]


def _rows(shapes: list[tuple[int, int]], generator: torch.Generator) -> list[RowShape]:
    """Rows whose blocks are drawn at random from the pool, so neighbours in a row are far apart."""
    ids = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    rows = []
    for start, num_new in shapes:
        count = -(-(start + num_new) // BLOCK)
        rows.append(RowShape(start, num_new, ids[:count]))
        ids = ids[count:]
    return rows


def _metadata(rows: list[RowShape]):
    """The kernel's int32 row offsets, contexts and zero-padded block table."""
    starts = torch.tensor([0] + [r.num_new for r in rows], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    contexts = torch.tensor([r.start + r.num_new for r in rows], dtype=torch.int32)  # [num_rows]
    table = torch.zeros(len(rows), max(len(r.block_ids) for r in rows), dtype=torch.int32)
    for index, row in enumerate(rows):
        table[index, : len(row.block_ids)] = torch.tensor(row.block_ids, dtype=torch.int32)
    return starts, contexts, table


def _step(shapes, group: int, head_dim: int, seed: int = 0):
    """A step's inputs and the reference output; the reference leaves the new k/v in the cache."""
    generator = torch.Generator().manual_seed(seed)
    rows = _rows(shapes, generator)
    num_tokens = sum(r.num_new for r in rows)
    # Blocks are pages of an arena holding k and v side by side, so the caches are strided views.
    pages = torch.randn(NUM_BLOCKS, 2, KV_HEADS, BLOCK, head_dim, generator=generator)
    k_cache, v_cache = pages[:, 0], pages[:, 1]  # [blocks, kv_heads, block, head_dim]
    q = torch.randn(num_tokens, KV_HEADS * group, head_dim, generator=generator)
    k = torch.randn(num_tokens, KV_HEADS, head_dim, generator=generator)
    v = torch.randn(num_tokens, KV_HEADS, head_dim, generator=generator)
    batch = build_attention_batch(rows, BLOCK, head_dim, "cpu")
    expected = paged_attention(q, k, v, k_cache, v_cache, batch)  # [num_tokens, heads, head_dim]
    return q, k_cache, v_cache, _metadata(rows), batch.scale, expected


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ragged_step_matches_reference(group, head_dim):
    q, k_cache, v_cache, metadata, scale, expected = _step(MIXED_ROWS, group, head_dim)
    out = paged_attention_triton(q, k_cache, v_cache, *metadata, scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_split_counts_give_the_same_result():
    # A long decode and a later prefill chunk, their contexts shared among 1, 2 and 3 programs.
    q, k_cache, v_cache, metadata, scale, expected = _step([(70, 1), (40, 9), (0, 3)], 3, 64, seed=1)
    outs = [paged_attention_triton(q, k_cache, v_cache, *metadata, scale, num_splits=n) for n in (1, 2, 3)]
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_only_step_matches_reference(num_splits):
    # Single-token rows get the small tile: a few tokens of each row's KV head group per program.
    q, k_cache, v_cache, metadata, scale, expected = _step([(15, 1), (16, 1), (40, 1)], 3, 128, seed=4)
    out = paged_attention_triton(q, k_cache, v_cache, *metadata, scale, num_splits=num_splits)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_default_split_on_a_wide_block_table_matches_reference():
    # A table padded to 64 blocks (1,024 tokens) makes the default split the context; padding points at block 0.
    q, k_cache, v_cache, (starts, contexts, table), scale, expected = _step([(70, 1), (40, 9)], 4, 64, seed=3)
    wide = torch.zeros(table.shape[0], 64, dtype=torch.int32)
    wide[:, : table.shape[1]] = table
    out = paged_attention_triton(q, k_cache, v_cache, starts, contexts, wide, scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# bf16 is left out: the interpreter stores it as uint16 and its tl.dot multiplies the bit patterns
# (Triton's debugging guide: the interpreter does not support operations on bfloat16).
@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_matches_fp32_reference(dtype):
    # The reference attends in fp32 over inputs already rounded to `dtype`.
    q, k_cache, v_cache, metadata, scale, _ = _step(MIXED_ROWS, 4, 64, seed=2)
    q, k_cache, v_cache = (t.to(dtype) for t in (q, k_cache, v_cache))
    expected = _reference_on(q.float(), k_cache.float(), v_cache.float(), metadata, scale)
    out = paged_attention_triton(q, k_cache, v_cache, *metadata, scale, num_splits=2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def _reference_on(q, k_cache, v_cache, metadata, scale):
    """The torch reference over a cache that already holds every token: rewriting them is a no-op."""
    starts, contexts, table = metadata
    rows = [RowShape(int(c) - int(e - s), int(e - s), table[i].tolist()) for i, (s, e, c) in
            enumerate(zip(starts[:-1], starts[1:], contexts))]
    batch = build_attention_batch(rows, BLOCK, q.shape[-1], "cpu")
    k = k_cache[batch.write_blocks, :, batch.write_offsets]  # [num_tokens, kv_heads, head_dim]
    v = v_cache[batch.write_blocks, :, batch.write_offsets]
    return paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), batch)


@pytest.mark.parametrize(("change", "named"), [
    (lambda a: {**a, "row_starts": a["row_starts"].long()}, "row_starts"),
    (lambda a: {**a, "k_cache": a["k_cache"].double()}, "k_cache"),
    (lambda a: {**a, "block_table": a["block_table"][:1]}, "block_table"),
    (lambda a: {**a, "q": a["q"][:, :5]}, "kv heads"),
    (lambda a: {**a, "num_splits": 0}, "num_splits"),
])
def test_bad_arguments_are_named(change, named):
    q, k_cache, v_cache, (starts, contexts, table), scale, _ = _step(MIXED_ROWS, 3, 64)
    arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, row_starts=starts, row_contexts=contexts,
                     block_table=table, scale=scale)
    with pytest.raises(ValueError, match=named):
        paged_attention_triton(**change(arguments))


def test_the_engines_attention_layer_gives_the_same_through_the_kernel():
    """What a GPU worker runs: the step's metadata built for the kernel, the new k/v written into
    the pool, then one launch for every row, against the torch path on the same inputs."""
    generator = torch.Generator().manual_seed(5)
    rows = _rows(MIXED_ROWS, generator)
    num_tokens, heads = sum(row.num_new for row in rows), KV_HEADS * 3
    q = torch.randn(num_tokens, heads, 64, generator=generator)  # [tokens, heads, hd]
    k, v = (torch.randn(num_tokens, KV_HEADS, 64, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, KV_HEADS, BLOCK, 64, generator=generator) for _ in range(2))
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), build_attention_batch(rows, BLOCK, 64, "cpu"))
    batch = ragged_attention_batch(rows, BLOCK, 64, "cpu", paged_attention_triton)
    assert batch.ragged is not None and batch.decode is None and not batch.prefills
    out = paged_attention(q, k, v, k_cache, v_cache, batch)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_block_tables_kept_on_the_device_by_deltas_feed_the_kernel():
    """A second step carries only the blocks the worker lacks, and a released request's slot is
    taken by a new one: the kernel reading the device table still gives the torch path's output."""
    generator = torch.Generator().manual_seed(6)
    kernels = AttentionKernels(BLOCK, 64, torch.float32, ragged_kernel=paged_attention_triton)
    tables, uploader = BlockTables(torch.device("cpu"), mirrored=True), Uploader(torch.device("cpu"))
    first = [StepRow("a", [1] * 20, 0, [3, 7]), StepRow("b", [1] * 5, 0, [1]), StepRow("c", [1] * 16, 0, [9])]
    build_step_inputs(first, [], tables, None, kernels, uploader)
    second = [StepRow("a", [1], 20, [], 2), StepRow("c", [1], 16, [4], 1), StepRow("d", [1] * 3, 0, [5])]
    batch = build_step_inputs(second, ["b"], tables, None, kernels, uploader).attention
    assert tables.slots["d"] == 1  # b's slot, reused
    shapes = [RowShape(20, 1, [3, 7]), RowShape(16, 1, [9, 4]), RowShape(0, 3, [5])]
    q = torch.randn(5, KV_HEADS * 2, 64, generator=generator)  # [tokens, heads, hd]
    k, v = (torch.randn(5, KV_HEADS, 64, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, KV_HEADS, BLOCK, 64, generator=generator) for _ in range(2))
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), build_attention_batch(shapes, BLOCK, 64, "cpu"))
    out = paged_attention(q, k, v, k_cache, v_cache, batch)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_decode_step_padded_to_its_bucket_attends_its_rows_as_unpadded():
    """Three decode rows padded to a bucket of four through the worker's step builder: the kernels
    give the real rows what the same step unpadded gives them, and the padding row writes only the
    padding block (the page past the pool's)."""
    from seesaw.model.triton_attention import write_kv_triton
    from seesaw.runtime.step_bounds import StepBounds, decode_buckets

    generator = torch.Generator().manual_seed(8)
    bounds = StepBounds(max_tokens=64, max_rows=8, num_blocks=NUM_BLOCKS, max_blocks_per_request=4)
    rows = [StepRow("a", [7], 15, [3]), StepRow("b", [7], 16, [4, 11]), StepRow("c", [7], 40, [5, 0, 8])]
    pages = torch.randn(NUM_BLOCKS + 1, 2, KV_HEADS, BLOCK, 64, generator=generator)  # [pages, k/v, ...]
    q = torch.randn(4, KV_HEADS * 2, 64, generator=generator)  # [bucket, heads, hd]: the last row pads
    k, v = (torch.randn(4, KV_HEADS, 64, generator=generator) for _ in range(2))
    outputs, caches = [], []
    for buckets, num_tokens in (((), 3), (decode_buckets(8), 4)):
        kernels = AttentionKernels(BLOCK, 64, torch.float32, ragged_kernel=paged_attention_triton,
                                   kv_writer=write_kv_triton, group=2, decode_buckets=buckets)
        tables, uploader = BlockTables(torch.device("cpu"), mirrored=True, bounds=bounds), Uploader(torch.device("cpu"))
        batch = build_step_inputs(rows, [], tables, None, kernels, uploader).attention
        assert batch.write_blocks.shape[0] == num_tokens
        cache = pages.clone()
        outputs.append(paged_attention(q[:num_tokens], k[:num_tokens], v[:num_tokens], cache[:, 0], cache[:, 1], batch))
        caches.append(cache)
    torch.testing.assert_close(outputs[1][:3], outputs[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[1][:NUM_BLOCKS], caches[0][:NUM_BLOCKS])
    assert not torch.equal(caches[1][NUM_BLOCKS], pages[NUM_BLOCKS])


def test_the_kv_writer_puts_each_token_where_torch_indexing_does():
    from seesaw.model.triton_attention import write_kv_triton

    generator = torch.Generator().manual_seed(7)
    pages = torch.randn(NUM_BLOCKS, 2, KV_HEADS, BLOCK, 64, generator=generator)  # k and v side by side
    qkv = torch.randn(9, 3 * KV_HEADS, 64, generator=generator)  # k and v are strided views of it
    k, v = qkv[:, KV_HEADS : 2 * KV_HEADS], qkv[:, 2 * KV_HEADS :]
    blocks = torch.tensor([3, 3, 7, 0, 12, 12, 12, 5, 23], dtype=torch.int32)
    offsets = torch.tensor([0, 1, 15, 4, 8, 9, 10, 2, 15], dtype=torch.int32)
    expected = pages.clone()
    expected[blocks.long(), 0, :, offsets.long()] = k
    expected[blocks.long(), 1, :, offsets.long()] = v
    write_kv_triton(k, v, pages[:, 0], pages[:, 1], blocks, offsets)
    assert torch.equal(pages, expected)


def test_warming_up_launches_every_variant_on_a_tiny_step():
    from seesaw.model import triton_attention

    launched = []
    for name in ("_attend_kernel", "_combine_kernel", "_write_kv_kernel"):
        kernel = getattr(triton_attention, name)
        launched_kernel = _Recorded(kernel, launched, name)
        setattr(triton_attention, name, launched_kernel)
    try:
        triton_attention.warm_up(8, 2, 64, BLOCK, torch.float32, torch.device("cpu"))
    finally:
        for name in ("_attend_kernel", "_combine_kernel", "_write_kv_kernel"):
            setattr(triton_attention, name, getattr(triton_attention, name).kernel)
    tiles = {(kwargs["TILE"], kwargs["IS_SPLIT"]) for name, kwargs in launched if name == "_attend_kernel"}
    widths = {kwargs["SPLITS_PADDED"] for name, kwargs in launched if name == "_combine_kernel"}
    assert tiles == {(4, False), (4, True), (16, False), (16, True)}  # decode and prefill tiles, split or not
    assert widths == {2, 4, 8, 16} and ("_write_kv_kernel", {"HEADS_PADDED": 2, "HEAD_DIM": 64}) in launched


class _Recorded:
    """A kernel whose launches are noted (name and compile-time arguments) and then run."""

    def __init__(self, kernel, launched: list, name: str):
        self.kernel, self.launched, self.name = kernel, launched, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append((self.name, {k: v for k, v in kwargs.items() if k.isupper()}))
            return self.kernel[grid](*args, **kwargs)

        return launch
