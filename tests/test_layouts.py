"""Every static layout gives t1's greedy outputs: tensor, pipeline and data parallel workers on CPU
with gloo, on tiny random models and on the default model."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from helpers import default_config, engine_config, generate, greedy_requests, random_prompts
from seesaw.layout import Layout, groups_of
from seesaw.messages import Backend, CollectiveSpec, GroupSpec, LoadShard
from seesaw.step import RowSampling, StepRow
from seesaw.transport.collective import free_tcp_address

TINY_LAYOUTS = ["t2", "p2", "d2", "t2p2"]


@pytest.fixture(scope="module")
def tiny_prompts():
    return random_prompts(10, [4, 50, 17, 90, 1], seed=11)


@pytest.fixture(scope="module")
def tiny_t1(tiny_models, tiny_prompts):
    folder = str(tiny_models["llama-gqa-tied"])
    results = generate(_config(folder, "t1"), _requests(tiny_prompts, 12))
    return [r.token_ids for r in results]


def _config(source: str, layout: str, budget: int = 48):
    return engine_config(source, layout=layout, scheduler={"max_num_batched_tokens": budget})


_requests = greedy_requests


@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_tiny_model_layouts_match_t1(tiny_models, tiny_prompts, tiny_t1, layout):
    results = generate(_config(str(tiny_models["llama-gqa-tied"]), layout), _requests(tiny_prompts, 12))
    assert [r.token_ids for r in results] == tiny_t1


def test_tensor_parallel_with_qkv_bias_and_untied_head_matches_t1(tiny_models, tiny_prompts):
    folder = str(tiny_models["qwen2-bias"])
    single = generate(_config(folder, "t1"), _requests(tiny_prompts, 8))
    split = generate(_config(folder, "t2"), _requests(tiny_prompts, 8))
    assert [r.token_ids for r in split] == [r.token_ids for r in single]


@pytest.mark.parametrize("layout", ["t2", "t3", "p2", "d2", "t2p2"])
def test_default_model_layouts_match_t1(default_t1, default_prompts, layout):
    results = generate(default_config(layout), greedy_requests(default_prompts, 24))
    matches = sum(r.token_ids == expected for r, expected in zip(results, default_t1))
    # Sums reorder under tensor parallelism (and with batch shapes); a near tie may flip a token.
    # The logits test below bounds how far the layouts drift apart.
    assert matches >= 0.95 * len(default_prompts)


def _shard_logits(layouts: list[str], rank: int, command_fields: dict, rows, queue, with_nccl_standin: bool,
                  warm_up: bool) -> None:
    """Worker body: build one shard (in the first layout, then re-sharded through the others; with
    `warm_up`, every group warmed first, as before a profiling step), run one step, hand back the
    gathered logits from the sampling rank."""
    if with_nccl_standin:
        import nccl_standin

        nccl_standin.install()
    from seesaw.actors.worker_setup import build_runtime

    runtime = build_runtime(LoadShard(rank=rank, layouts=[Layout.parse(text) for text in layouts], **command_fields))
    try:
        if warm_up:
            runtime.warm_up_groups()
        for layout in layouts[1:]:
            runtime.reshard(Layout.parse(layout))
        logits = runtime.current.forward(runtime.inputs(rows)).logits
        if runtime.is_sampling:
            queue.put(logits.numpy().copy())  # by value: the process may exit before it is read
    finally:
        runtime.close()


def _logits(model, layout: str, rows, backend: Backend = Backend.GLOO, warm_up: bool = False) -> torch.Tensor:
    """The logits of one step at `layout` ("p2->t2": loaded at p2, re-sharded to t2, then run),
    from one process per worker joined over `backend` (NCCL: the gloo-backed stand-in)."""
    layouts = layout.split("->")
    parsed = [Layout.parse(text) for text in layouts]
    collective = None
    if parsed[0].world_size > 1:
        if backend == Backend.NCCL:
            import nccl_standin

            groups = [GroupSpec(key, ranks, nccl_standin.get_unique_id()) for key, ranks in groups_of(parsed, 0)]
            collective = CollectiveSpec(Backend.NCCL, parsed[0].world_size, groups)
        else:
            groups = [GroupSpec(key, ranks) for key, ranks in groups_of(parsed, 0)]
            collective = CollectiveSpec(Backend.GLOO, parsed[0].world_size, groups, free_tcp_address())
    fields = dict(
        hf_config=model.hf_config, weights_folder=str(model.weights_folder), weight_store=None,
        dummy_seed=0,
        dtype="float32", device="cpu", block_size=16, kv_cache_bytes=64 << 20, memory_fraction=0.9,
        num_threads=1, host_buffer=None, collective=collective, scheduler_address="", kv_tier_address="",
        join_timeout_s=60,
    )
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_shard_logits,
                                 args=(layouts, rank, fields, rows, queue, backend == Backend.NCCL, warm_up))
                 for rank in range(parsed[0].world_size)]
    for process in processes:
        process.start()
    try:
        return torch.from_numpy(queue.get(timeout=180))
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()


@pytest.mark.parametrize("layout", ["t2", "t3", "t2p2"])
def test_default_model_logits_agree_with_t1_within_1e_4(default_model, default_prompts, layout):
    rows = [StepRow(str(i), p, 0, list(range(8 * i, 8 * i + 8)), sampling=RowSampling(0.0))
            for i, p in enumerate(default_prompts[:4])]
    reference = _logits(default_model, "t1", rows)
    split = _logits(default_model, layout, rows)
    relative = (split - reference).abs().max() / reference.abs().max()
    assert relative < 1e-4


@pytest.fixture(scope="module")
def tiny_resolved(tiny_models):
    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model

    return resolve_model(str(tiny_models["llama-gqa-tied"]), default_cache_dir())


@pytest.fixture(scope="module")
def tiny_rows(tiny_prompts):
    return [StepRow(str(i), p, 0, list(range(8 * i, 8 * i + 8)), sampling=RowSampling(0.0))
            for i, p in enumerate(tiny_prompts[:4])]


@pytest.fixture(scope="module")
def tiny_t1_logits(tiny_resolved, tiny_rows):
    return _logits(tiny_resolved, "t1", tiny_rows)


@pytest.mark.parametrize("layout", ["t2", "p2", "t2p2", "p2->t2"])
def test_layouts_through_the_nccl_code_path_agree_with_t1(tiny_resolved, tiny_rows, tiny_t1_logits, layout,
                                                          tmp_path, monkeypatch):
    """The workers' NCCL communicators (cupy's NCCL replaced by a gloo-backed stand-in) carry the
    tensor-parallel sums, the pipeline's activations and the gathered logits, after a re-shard too."""
    import nccl_standin

    monkeypatch.setenv(nccl_standin.STANDIN_DIR, str(tmp_path))  # the workers inherit it
    split = _logits(tiny_resolved, layout, tiny_rows, Backend.NCCL)
    relative = (split - tiny_t1_logits).abs().max() / tiny_t1_logits.abs().max()
    assert relative < 1e-5


@pytest.mark.parametrize("layout", ["p2->t2", "t2p2"])
def test_warming_every_group_before_profiling_completes_through_the_nccl_code_path(
        tiny_resolved, tiny_rows, tiny_t1_logits, layout, tmp_path, monkeypatch):
    """Each rank warms the groups of all the run's layouts (all-reduces, passes down the pipeline,
    at three sizes) in an order its peers share: every rank gets through, and the step after gives
    t1's logits."""
    import nccl_standin

    monkeypatch.setenv(nccl_standin.STANDIN_DIR, str(tmp_path))
    split = _logits(tiny_resolved, layout, tiny_rows, Backend.NCCL, warm_up=True)
    relative = (split - tiny_t1_logits).abs().max() / tiny_t1_logits.abs().max()
    assert relative < 1e-5
