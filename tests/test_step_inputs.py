"""A worker's step inputs: block tables kept by deltas, tokens awaited from the step before, the
profiling step that sizes a GPU's KV pool, and what CUDA graphs will need: buffers sized once from
the step bounds, and decode steps padded to buckets that present the same tensors every time."""

from __future__ import annotations

import pytest
import torch

from seesaw.runtime.step_bounds import BUCKET_STRIDE, StepBounds, bucket_for, decode_buckets
from seesaw.runtime.step_inputs import (
    AttentionKernels,
    BlockTables,
    SampledTokens,
    Uploader,
    build_step_inputs,
)
from seesaw.runtime.worker_runtime import ProfileStep
from seesaw.step import RowSampling, StepRow

CPU = torch.device("cpu")
KERNELS = AttentionKernels(block_size=4, head_dim=16, dtype=torch.float32)


def build(rows, released=(), tables=None, before=None):
    tables = tables or BlockTables(CPU, mirrored=False)
    return build_step_inputs(rows, list(released), tables, before, KERNELS, Uploader(CPU)), tables


def test_tables_follow_deltas_and_the_device_mirror_reuses_released_slots():
    tables = BlockTables(CPU, mirrored=True)
    build([StepRow("a", [1] * 9, 0, [4, 5, 6]), StepRow("b", [1], 0, [7])], tables=tables)
    build([StepRow("a", [1], 9, [8], 3)], tables=tables)  # a grows by one block
    build([StepRow("b", [1] * 5, 0, [9, 10])], tables=tables)  # b starts over (its KV moved)
    assert tables.blocks == {"a": [4, 5, 6, 8], "b": [9, 10]}
    assert tables.table[tables.slots["a"], :4].tolist() == [4, 5, 6, 8]
    build([StepRow("c", [1] * 70, 0, list(range(20, 38)))], released=["a"], tables=tables)  # wider than before
    assert tables.slots["c"] == 0 and "a" not in tables.blocks
    assert tables.table[0, :18].tolist() == list(range(20, 38))
    assert tables.table[tables.slots["b"], :2].tolist() == [9, 10]  # kept through the table's growth


def test_a_row_cannot_skip_blocks_the_worker_lacks():
    with pytest.raises(ValueError, match="holds only 0"):
        BlockTables(CPU, mirrored=False).update([StepRow("a", [1], 8, [3], 2)])


def test_awaited_tokens_come_from_the_step_before():
    before = SampledTokens({"a": 1, "b": 0}, torch.tensor([55, 66]))
    rows = [StepRow("a", [], 7, [1, 2], sampling=RowSampling(0.0), awaits_token=True),
            StepRow("c", [8, 9], 0, [3], sampling=RowSampling(0.0))]
    tables = BlockTables(CPU, mirrored=False)
    tables.update([StepRow("a", [0] * 7, 0, [1, 2])])
    inputs, _ = build(rows, tables=tables, before=before)
    assert inputs.token_ids.tolist() == [66, 8, 9]
    assert inputs.positions.tolist() == [7, 0, 1]
    assert inputs.sample_index.tolist() == [0, 2] and inputs.sampled_ids == ["a", "c"]
    missing = [StepRow("z", [], 3, [5], sampling=RowSampling(0.0), awaits_token=True)]
    with pytest.raises(ValueError, match="request z's row awaits"):
        build(missing, before=before)


def test_the_profiling_step_spends_the_whole_budget_on_sampling_rows():
    step = ProfileStep(num_tokens=1000, num_rows=256)
    rows = step.rows(block_size=16)
    assert sum(len(row.token_ids) for row in rows) == 1000 and len(rows) == 256
    # Sampling with temperature, top-k and top-p: the sampler's sort buffers are in the measured peak.
    assert all(row.sampling.temperature > 0 and 0 < row.sampling.top_k and row.sampling.top_p < 1 for row in rows)
    blocks = [block for row in rows for block in row.new_block_ids]
    assert sorted(blocks) == list(range(step.num_blocks(16)))


def test_decode_buckets_pad_each_batch_size_by_less_than_a_stride():
    buckets = decode_buckets(256)
    assert buckets[:5] == (1, 2, 4, 8, 16) and buckets[-1] == 256 and len(buckets) == 3 + 32
    assert all(bucket_for(n, buckets) - n < BUCKET_STRIDE for n in range(1, 257))
    assert bucket_for(257, buckets) is None and decode_buckets(6) == (1, 2, 4, 6)


def test_the_largest_step_its_bounds_allow_fills_its_upload_exactly():
    """Every segment at its bound at once: as many one-token rows as tokens, each awaiting its token,
    sampling, carrying all its blocks anew (its KV just came back), with one-token query tiles (16
    query heads per KV head); a buffer one value smaller is refused, naming its sizing."""
    bounds = StepBounds(max_tokens=8, max_rows=8, num_blocks=32, max_blocks_per_request=4)
    kernels = AttentionKernels(4, 16, torch.float32, ragged_kernel=lambda *args, **kwargs: None, group=16)
    rows = [StepRow(f"r{i}", [], 15, list(range(4 * i, 4 * i + 4)), sampling=RowSampling(0.0), awaits_token=True)
            for i in range(8)]
    before = SampledTokens({f"r{i}": i for i in range(8)}, torch.arange(8))
    capacity = bounds.upload_values(is_ragged=True)
    inputs = build_step_inputs(rows, [], BlockTables(CPU, mirrored=True, bounds=bounds), before, kernels,
                               Uploader(CPU, capacity))
    assert inputs.attention.ragged.tiles.tile == 1 and inputs.token_ids.tolist() == list(range(8))
    with pytest.raises(ValueError, match=f"take {capacity} values, past the {capacity - 1} its upload buffer"):
        build_step_inputs(rows, [], BlockTables(CPU, mirrored=True, bounds=bounds), before, kernels,
                          Uploader(CPU, capacity - 1))


def test_the_device_table_is_allocated_once_and_refuses_past_its_bounds():
    bounds = StepBounds(max_tokens=64, max_rows=8, num_blocks=2, max_blocks_per_request=2)
    tables = BlockTables(CPU, mirrored=True, bounds=bounds)
    address = tables.table.data_ptr()
    tables.update([StepRow("a", [1] * 5, 0, [0]), StepRow("b", [1], 0, [1])])
    with pytest.raises(ValueError, match="request c needs a row of the device block table, but all 2"):
        tables.update([StepRow("c", [1], 0, [1])])
    with pytest.raises(ValueError, match="request a holds 3 blocks, .* 2 columns"):
        tables.update([StepRow("a", [1] * 5, 5, [1, 0], 1)])
    assert tables.table.data_ptr() == address and tables.table.shape == (3, 2)
    assert tables.table[tables.padding_slot].tolist() == [2, 2]  # the padding block, after the pool's


def test_a_padded_decode_step_writes_and_reads_only_the_padding_block_past_its_rows():
    bounds = StepBounds(max_tokens=64, max_rows=8, num_blocks=16, max_blocks_per_request=4)
    kernels = AttentionKernels(4, 16, torch.float32, ragged_kernel=lambda *args, **kwargs: None,
                               decode_buckets=decode_buckets(8))
    tables = BlockTables(CPU, mirrored=True, bounds=bounds)
    uploader = Uploader(CPU, bounds.upload_values(is_ragged=True))
    prompts = [StepRow(f"r{i}", [1] * 5, 0, [2 * i, 2 * i + 1]) for i in range(3)]
    build_step_inputs(prompts, [], tables, None, kernels, uploader)
    decodes = [StepRow(f"r{i}", [7], 5, [], 2, sampling=RowSampling(0.0)) for i in range(3)]
    inputs = build_step_inputs(decodes, [], tables, None, kernels, uploader)
    ragged = inputs.attention.ragged
    assert inputs.token_ids.shape[0] == 4 and inputs.sample_index.tolist() == [0, 1, 2]  # 3 rows -> bucket 4
    assert inputs.attention.write_blocks.tolist() == [1, 3, 5, bounds.padding_block]
    assert ragged.row_contexts.tolist() == [6, 6, 6, 1] and ragged.row_starts.tolist() == [0, 1, 2, 3, 4]
    assert ragged.block_table.shape == (4, 4) and ragged.block_table[3].tolist() == [bounds.padding_block] * 4
    assert ragged.tiles.rows.tolist() == [0, 1, 2, 3]


def test_every_decode_step_of_a_bucket_presents_a_graph_the_same_tensors(monkeypatch):
    """Under the CUDA stand-in (the upload staged into its one device buffer): decode steps of 5
    and 7 rows, at different contexts, after different prefills, both pad to bucket 8, and every
    tensor their forward pass reads has the same address, shape and strides."""
    import cuda_standin

    cuda_standin.install(monkeypatch)
    gpu = torch.device("cuda", 0)
    bounds = StepBounds(max_tokens=64, max_rows=16, num_blocks=64, max_blocks_per_request=8)
    kernels = AttentionKernels(4, 16, torch.float32, ragged_kernel=lambda *args, **kwargs: None, group=2,
                               decode_buckets=decode_buckets(16))
    tables = BlockTables(gpu, mirrored=True, bounds=bounds)
    uploader = Uploader(gpu, bounds.upload_values(is_ragged=True))

    def decode_step(num_rows: int, context: int, first_block: int):
        blocks = -(-context // 4)
        prompts = [StepRow(f"{num_rows}-{i}", [1] * context, 0,
                           list(range(first_block + i * blocks, first_block + (i + 1) * blocks)),
                           sampling=RowSampling(0.0)) for i in range(num_rows)]
        build_step_inputs(prompts, [], tables, None, kernels, uploader)
        decodes = [StepRow(row.request_id, [3], context, [], blocks, sampling=RowSampling(0.0)) for row in prompts]
        inputs = build_step_inputs(decodes, [], tables, None, kernels, uploader)
        ragged = inputs.attention.ragged
        read = [inputs.token_ids, inputs.positions, inputs.attention.write_blocks, inputs.attention.write_offsets,
                ragged.row_starts, ragged.row_contexts, ragged.block_table, *ragged.tiles[:3]]
        return [(t.data_ptr(), tuple(t.shape), t.stride()) for t in read], ragged.tiles.tile

    five = decode_step(5, context=6, first_block=0)
    seven = decode_step(7, context=9, first_block=20)
    assert five == seven
