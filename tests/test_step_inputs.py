"""A worker's step inputs: block tables kept by deltas, tokens awaited from the step before, and
the profiling step that sizes a GPU's KV pool."""

from __future__ import annotations

import pytest
import torch

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
