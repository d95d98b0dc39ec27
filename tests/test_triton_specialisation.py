"""How many times a run compiles each Triton kernel: the specialisation keys Triton's own binder
gives (for an H100 target) to every launch of a simulated 256 x (512 + 128) run, worked out on CPU
without launching anything. Nothing that changes from step to step may start a new compile."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: the kernels are interpreted here
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU rehearsal")
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from seesaw.model.triton_attention import paged_attention_triton, write_kv_triton  # noqa: E402
from seesaw.runtime.step_inputs import AttentionKernels, BlockTables, Uploader, build_step_inputs  # noqa: E402
from seesaw.step import RowSampling, StepRow  # noqa: E402

CPU = torch.device("cpu")
BLOCK, HEAD_DIM, KV_HEADS, GROUP = 16, 64, 1, 4
NUM_REQUESTS, PROMPT, OUTPUT, BUDGET = 256, 512, 128, 2048


class Specialisations:
    """Records the key Triton would compile each launch under, per kernel, launching nothing."""

    def __init__(self):
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders: dict[str, object] = {}
        self.keys: dict[str, set[str]] = {}

    def run(self, kernel: InterpretedFunction, *args, grid, warmup, **kwargs):
        name = kernel.fn.__name__
        if name not in self.binders:
            jit = JITFunction(kernel.fn, **kernel.kwargs)  # as the GPU decorates it: same no-specialise lists
            self.binders[name] = create_function_from_signature(jit.signature, jit.params, self.backend)
        _, specialization, options = self.binders[name](*args, **kwargs)
        self.keys.setdefault(name, set()).add(repr((specialization, sorted(options.items()))))


def _planned_steps() -> list[list[StepRow]]:
    """Continuous batching as the static scheduler plans it: each step decodes every request whose
    prompt is in, then fills the rest of the token budget with prompt chunks, in arrival order."""
    blocks_per_request = -(-(PROMPT + OUTPUT) // BLOCK)
    cached = [0] * NUM_REQUESTS  # tokens in the cache per request
    steps = []
    while any(count < PROMPT + OUTPUT - 1 for count in cached):
        rows, budget = [], BUDGET
        for request, count in enumerate(cached):
            num_new = 1 if count >= PROMPT else min(PROMPT - count, budget)
            if count >= PROMPT + OUTPUT - 1 or budget == 0 or (count < PROMPT and num_new < 1):
                continue
            held, needed = -(-count // BLOCK), -(-(count + num_new) // BLOCK)
            first = request * blocks_per_request
            rows.append(StepRow(f"r{request}", [1] * num_new, count, list(range(first + held, first + needed)),
                                held, sampling=RowSampling(0.0) if count + num_new >= PROMPT else None))
            cached[request] += num_new
            budget -= num_new
        steps.append(rows)
    return steps


def _simulated_run(steps: list[list[StepRow]]) -> None:
    """Every step through the worker's step builder, then the attention launches one layer makes."""
    kernels = AttentionKernels(BLOCK, HEAD_DIM, torch.float32, ragged_kernel=paged_attention_triton,
                               kv_writer=write_kv_triton, group=GROUP)
    tables, uploader = BlockTables(CPU, mirrored=True), Uploader(CPU)
    cache = torch.zeros(2, KV_HEADS, BLOCK, HEAD_DIM)  # never read: nothing launches
    for rows in steps:
        batch = build_step_inputs(rows, [], tables, None, kernels, uploader).attention
        num_tokens = batch.write_blocks.shape[0]
        q = torch.zeros(num_tokens, KV_HEADS * GROUP, HEAD_DIM)  # [tokens, heads, hd]
        k = torch.zeros(num_tokens, KV_HEADS, HEAD_DIM)
        batch.kv_writer(k, k, cache, cache, batch.write_blocks, batch.write_offsets)
        ragged = batch.ragged
        batch.ragged_kernel(q, cache, cache, ragged.row_starts, ragged.row_contexts, ragged.block_table, 1.0,
                            tiles=ragged.tiles)


def test_a_whole_run_compiles_each_kernel_once_per_tile_shape(monkeypatch):
    record = Specialisations()
    monkeypatch.setattr(InterpretedFunction, "run", lambda kernel, *args, **kwargs: record.run(kernel, *args, **kwargs))
    steps = _planned_steps()
    _simulated_run(steps)
    counts = {name: len(keys) for name, keys in record.keys.items()}
    assert len({len(rows) for rows in steps}) > 10  # row counts, token counts and table widths vary
    # A prefill tile and a decode tile; no split (256 rows keep a GPU busy) and 2-way splits of a
    # lone long context are the only other variants a run may see, and these rows see neither.
    assert counts == {"_write_kv_kernel": 1, "_attend_kernel": 2}, counts
