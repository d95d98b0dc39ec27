"""What one decode step costs a GPU worker in launches, counted on CPU: the forward pass with the
GPU's kernels (Triton under its interpreter) at the default model's shape, every torch op and
every Triton launch counted, per layer and per step. A GPU runs each as at least one kernel
launch, so these budgets bound the launch overhead of a step before a GPU is at hand."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: run the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter counts")
triton = pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from seesaw.layout import Layout, shard_for  # noqa: E402
from seesaw.model.llama import ShardModel  # noqa: E402
from seesaw.model.rope import inverse_frequencies  # noqa: E402
from seesaw.model.sampler import Sampler  # noqa: E402
from seesaw.model.spec import ModelSpec  # noqa: E402
from seesaw.runtime.arena import Arena, KVArena, block_elements, measure  # noqa: E402
from seesaw.runtime.layout_state import LayoutState, StageContext  # noqa: E402
from seesaw.runtime.step_inputs import BlockTables, Uploader, build_step_inputs  # noqa: E402
from seesaw.runtime.worker_runtime import _gpu_attention, _gpu_kernels  # noqa: E402
from seesaw.step import RowSampling, StepRow  # noqa: E402

CPU = torch.device("cpu")
BLOCK = 16
NUM_ROWS = 8
# Per layer: norm (fused with the residual add), qkv, q and k rotated at once, the k/v write,
# attention, output projection, residual add fused with the next norm, gate/up, activation, down.
LAUNCHES_PER_LAYER = 10
LAUNCHES_PER_STEP = 16  # upload, table gather, rotation tables, embedding, final add, logits, sampling


class LaunchCounter(TorchDispatchMode):
    """Counts torch ops that run a kernel (views and metadata changes excluded) and Triton launches
    (the interpreter's own tensor handling inside a launch is not counted)."""

    def __init__(self):
        super().__init__()
        self.torch_ops: list[str] = []
        self.triton_launches: list[str] = []
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._depth == 0 and not _is_view(func):
            self.torch_ops.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def launch(self, kernel: InterpretedFunction, run, *args, **kwargs):
        self.triton_launches.append(kernel.fn.__name__)
        self._depth += 1
        try:
            return run(kernel, *args, **kwargs)
        finally:
            self._depth -= 1

    @property
    def total(self) -> int:
        return len(self.torch_ops) + len(self.triton_launches)


def _is_view(func) -> bool:
    """Ops that launch nothing on a GPU: views (their results alias an input) and bare allocations."""
    returns_alias = any(ret.alias_info is not None and not ret.alias_info.is_write for ret in func._schema.returns)
    return returns_alias or func._schema.name in _NO_KERNEL


_NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::lift_fresh",
              "aten::_local_scalar_dense"}


def _stage(spec: ModelSpec) -> LayoutState:
    shard = shard_for(Layout.parse("t1"), spec.shape, 0)
    weights = Arena(measure(lambda allocate: ShardModel(spec, shard, allocate), torch.float32), CPU)
    model = ShardModel(spec, shard, weights.allocator(torch.float32), _gpu_kernels(spec, BLOCK))
    page = block_elements(shard, BLOCK, spec.head_dim)
    pages = KVArena(64 * page * 4, page, torch.float32, CPU).pages(shard, BLOCK, spec.head_dim)
    context = StageContext(spec, CPU, torch.float32, inverse_frequencies(spec.rope, spec.head_dim))
    return LayoutState(shard, model, pages, {}, context)


def _count_decode_step(spec: ModelSpec, monkeypatch) -> LaunchCounter:
    """Prefill NUM_ROWS short prompts, then count one decode step of all of them, sampling included."""
    state, kernels = _stage(spec), _gpu_attention(BLOCK, spec, torch.float32)
    tables, uploader, sampler = BlockTables(CPU, mirrored=True), Uploader(CPU), Sampler(CPU)
    greedy = RowSampling(0.0)
    prompts = [StepRow(f"r{i}", [5] * (3 + i), 0, [2 * i, 2 * i + 1], sampling=greedy) for i in range(NUM_ROWS)]
    with torch.inference_mode():
        state.forward(build_step_inputs(prompts, [], tables, None, kernels, uploader))
    decodes = [StepRow(f"r{i}", [7], 3 + i, [], 2, sampling=greedy) for i in range(NUM_ROWS)]
    counter = LaunchCounter()
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda kernel, *a, **k: counter.launch(kernel, run, *a, **k))
    with counter, torch.inference_mode():
        logits = state.forward(build_step_inputs(decodes, [], tables, None, kernels, uploader)).logits
        sampler.sample(logits, [greedy] * NUM_ROWS)
    monkeypatch.undo()
    return counter


@pytest.fixture(scope="module")
def default_spec(default_model) -> ModelSpec:
    return ModelSpec.from_hf_config(default_model.hf_config)


def test_a_decode_step_stays_within_its_launch_budget(default_spec, monkeypatch):
    two = _count_decode_step(replace(default_spec, num_layers=2), monkeypatch)
    four = _count_decode_step(replace(default_spec, num_layers=4), monkeypatch)
    per_layer = (four.total - two.total) / 2
    per_step = two.total - 2 * per_layer
    assert per_layer <= LAUNCHES_PER_LAYER, f"{per_layer} launches per layer: {four.torch_ops[-40:]}"
    assert per_step <= LAUNCHES_PER_STEP, f"{per_step} launches per step besides the layers: {two.torch_ops}"
    # Every layer's attention is one Triton launch with the k/v write one more: no per-layer tile map.
    assert four.triton_launches.count("_attend_kernel") == 4 and four.triton_launches.count("_write_kv_kernel") == 4
