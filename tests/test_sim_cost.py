"""Cost-model properties: tensor parallelism cuts weight time and adds all-reduce time, pipeline
parallelism splits the decode batch, and more bandwidth never predicts a slower run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from seesaw.config import SchedulerConfig
from seesaw.layout import Layout
from seesaw.sim.catalog import Catalog, Node
from seesaw.sim.cost import CostModel, step_shape
from seesaw.sim.simulator import RunSpec, simulate
from seesaw.sim.workload import arxiv, fixed
from seesaw.step import RowSampling, StepRow



def _rows(start: int, num_new: int, count: int) -> list[StepRow]:
    """`count` sampled rows of `num_new` new tokens after `start` computed ones."""
    return [StepRow(f"r{index}", [0] * num_new, start, [], sampling=RowSampling(temperature=0.0))
            for index in range(count)]


DECODE = step_shape(_rows(1000, 1, 64))  # 64 requests, one new token each, 1,000 tokens of context
PREFILL = step_shape(_rows(0, 2048, 4))


@pytest.fixture(scope="module")
def cost() -> CostModel:
    catalog = Catalog()
    return CostModel(catalog.model("llama3-8b"), catalog.node("4xL4"))


def test_tensor_parallelism_cuts_weight_time_and_adds_all_reduce(cost):
    t1, t4 = (cost.stage_terms(Layout(tp=tp), 0, DECODE) for tp in (1, 4))
    assert t4["weight_read_s"] == pytest.approx(t1["weight_read_s"] / 4, rel=0.01)
    assert t1["all_reduce_s"] == 0.0
    assert t4["all_reduce_s"] > 0.0
    # Larger steps move more activations through the all-reduce.
    assert cost.stage_terms(Layout(tp=4), 0, PREFILL)["all_reduce_s"] > t4["all_reduce_s"]


def test_pipeline_stages_split_the_layers_without_all_reduce(cost):
    stages = cost.stage_times(Layout(pp=4), DECODE)
    assert len(stages) == 4
    whole = cost.stage_s(Layout(), 0, DECODE)
    assert sum(stages) - 4 * cost.gpu.step_overhead_ms / 1000 == pytest.approx(
        whole - cost.gpu.step_overhead_ms / 1000, rel=0.02)
    assert all(cost.stage_terms(Layout(pp=4), s, DECODE)["all_reduce_s"] == 0.0 for s in range(4))


def test_stage_times_agree_with_the_named_terms(cost):
    for layout in (Layout(tp=2, pp=2), Layout(pp=4), Layout(tp=4)):
        for shape in (DECODE, PREFILL):
            assert cost.stage_times(layout, shape) == pytest.approx(
                [cost.stage_s(layout, stage, shape) for stage in range(layout.pp)])


def test_pipeline_parallelism_splits_the_decode_batch():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xA10"))
    workload = fixed(64, 32, 64)
    whole = simulate(cost, RunSpec(Layout(tp=2)), workload)
    split = simulate(cost, RunSpec(Layout(pp=2)), workload)
    assert whole.mean_decode_batch == pytest.approx(2 * split.mean_decode_batch, rel=0.1)


def _faster(node: Node, factor: float) -> Node:
    return replace(node, interconnect=replace(node.interconnect, bandwidth_gbs=node.interconnect.bandwidth_gbs * factor),
                   host_link=replace(node.host_link, bandwidth_gbs=node.host_link.bandwidth_gbs * factor),
                   gpu=replace(node.gpu, memory_bandwidth_gbs=node.gpu.memory_bandwidth_gbs * factor))


def test_more_bandwidth_never_makes_a_step_slower(cost):
    for factor in (1.5, 4.0, 100.0):
        faster = CostModel(cost.spec, _faster(cost.node, factor))
        for layout in (Layout(tp=4), Layout(pp=4), Layout(tp=2, pp=2)):
            for shape in (DECODE, PREFILL):
                assert faster.stage_times(layout, shape) <= cost.stage_times(layout, shape)
        assert faster.kv_copy_s(Layout(tp=4), 1000) < cost.kv_copy_s(Layout(tp=4), 1000)
        assert faster.reload_s(Layout(tp=4), 0) < cost.reload_s(Layout(tp=4), 0)


@pytest.mark.parametrize("run", ["t4", "p4", "p4->t4", "t2p2->t4"])
def test_more_bandwidth_never_predicts_a_slower_run(run):
    catalog = Catalog()
    node = catalog.node("4xL4", "pcie4x8")
    prefill, _, decode = run.partition("->")
    spec = RunSpec(Layout.parse(prefill), Layout.parse(decode) if decode else None, host_buffer_gb=12.0,
                   scheduler=SchedulerConfig(max_num_batched_tokens=4096))
    workload = arxiv(120, seed=1)
    times = [simulate(CostModel(catalog.model("llama3-8b"), _faster(node, factor)), spec, workload).elapsed_s
             for factor in (0.25, 1.0, 4.0, 16.0)]
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize("model", ["llama3-8b", "smollm2-135m"])  # untied and tied embeddings
def test_weight_bytes_are_what_the_engines_shards_allocate(model):
    import torch

    from seesaw.layout import shard_for
    from seesaw.model.llama import ShardModel
    from seesaw.runtime.arena import measure

    catalog = Catalog()
    spec = catalog.model(model)
    cost = CostModel(spec, catalog.node("8xL4"))
    for name in ("t1", "t2", "p2", "t2p2"):
        layout = Layout.parse(name)
        for stage in range(layout.pp):
            shards = [shard_for(layout, spec.shape, layout.rank_of(0, stage, tp)) for tp in range(layout.tp)]
            engine = max(measure(lambda allocate, shard=shard: ShardModel(spec, shard, allocate), torch.bfloat16)
                         for shard in shards)
            modelled = cost.shard_bytes(layout, stage)  # the stage's largest worker
            assert modelled == pytest.approx(engine, rel=0.01), (model, name, stage)  # norms and alignment aside


def test_kv_room_starts_from_the_memory_the_driver_reports():
    catalog = Catalog()
    l4, h200 = catalog.gpu("L4"), catalog.gpu("H200")
    assert l4.memory_bytes == 22.49 * 2**30 < l4.memory_gb * 2**30  # "24 GB" on the datasheet, 23,034 MiB visible
    assert h200.memory_bytes == h200.memory_gb * 2**30  # no visible figure given: the datasheet's, in GiB
    spec = catalog.model("llama2-70b")
    fewer = CostModel(spec, catalog.node("8xL4")).device_blocks([Layout(tp=8)], 16)
    more = CostModel(spec, replace(catalog.node("8xL4"), gpu=replace(l4, visible_memory_gib=24.0)))
    assert fewer < more.device_blocks([Layout(tp=8)], 16)


def test_model_that_does_not_fit_names_the_layout_and_the_gpu():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama2-70b"), catalog.node("2xL4"))
    with pytest.raises(ValueError, match="t2: a worker holds .* GiB of weights.* L4"):
        cost.device_blocks([Layout(tp=2)], 16)


# A calibrated two-worker CPU entry and its links, for the fits against the engine.
CPU_ENTRY = {"memory_gb": 16, "memory_bandwidth_gbs": 50.0, "peak_tflops": 0.1, "interconnect": "w2-gloo",
             "host_link": "w2-host", "host_memory_gb": 4, "dtype_bytes": 4, "matmul_efficiency": 0.9,
             "memory_efficiency": 0.9, "attention_efficiency": 0.5, "step_overhead_ms": 1.5, "kv_cache_gb": 2.0,
             "token_budget": 512, "copy_overlap": 0.0, "row_overhead_us": 900.0, "device": "cpu"}


def _cpu_links(hop_latency_us: float, copy_latency_us: float) -> dict:
    return {"w2-gloo": {"bandwidth_gbs": 4.0, "efficiency": 1.0, "latency_us": hop_latency_us,
                        "all_reduce_gbs": {"2": 2.0}, "source": "test"},
            "w2-host": {"bandwidth_gbs": 40.0, "efficiency": 1.0, "latency_us": copy_latency_us, "source": "test"}}


def test_link_latency_fit_recovers_the_wait_of_a_tensor_parallel_run(monkeypatch):
    """calibrate's third fit: an engine run at t2 slower than its simulation on idle-rank figures
    raises the link's latency per hop until the simulation takes as long (the engine's run is given
    here as the simulated time at a known latency, so the fit must find that latency)."""
    from seesaw.calibrate import measure

    spec = Catalog().model("llama3-8b")
    engine_s = measure._simulated_run("w2", CPU_ENTRY, _cpu_links(700.0, 0.0), spec, "t2", (32, 16, 64)).elapsed_s
    calls = []

    def engine_run(model, run, num_prompts, input_len, output_len, **options):
        calls.append(run)
        return {"elapsed_s": engine_s}

    monkeypatch.setattr(measure, "run_engine", engine_run)
    idle = _cpu_links(300.0, 0.0)
    fitted = measure.fit_link_to_engine("w2", CPU_ENTRY, idle, "w2-gloo", spec, 2, measure.FitRuns(threads=1),
                                        log=lambda line: None)
    assert calls == ["t2", "t2"]  # the faster of two runs
    assert fitted["latency_us"] == pytest.approx(700.0, rel=0.03)
    assert fitted["all_reduce_gbs"] == {"2": 2.0} and "fitted" in fitted["source"]
    refit = measure._simulated_run("w2", CPU_ENTRY, {**idle, "w2-gloo": fitted}, spec, "t2", (32, 16, 64))
    assert refit.elapsed_s == pytest.approx(engine_s, rel=0.01)


def test_host_link_fit_recovers_the_time_each_kv_copy_takes_in_a_seesaw_run(monkeypatch):
    """calibrate's fourth fit: a seesaw run slower than its simulation on the bare copy rate gives
    the host link a latency per KV copy. The engine's run is given as the simulated time at a known
    latency, plus one more phase switch and its reload (the engine meets the batch in the phase its
    warm-up left it in), which the fit must not count as the copies' time."""
    from seesaw.calibrate import measure

    spec = Catalog().model("llama3-8b")
    truth = measure._simulated_run("w2", CPU_ENTRY, _cpu_links(700.0, 5000.0), spec, "p2-t2", (64, 64, 4))
    assert truth.num_kv_copies == 128  # each request to the host buffer after its prefill and back
    switch_s = truth.reload_s / len(truth.transitions)  # a switch's reload
    calls = []

    def engine_run(model, run, num_prompts, input_len, output_len, **options):
        calls.append(run)
        return {"elapsed_s": truth.elapsed_s + switch_s, "transitions": len(truth.transitions) + 1}

    monkeypatch.setattr(measure, "run_engine", engine_run)
    fitted = measure.fit_host_link_to_engine("w2", CPU_ENTRY, _cpu_links(700.0, 0.0), "w2-host", spec, 2,
                                             measure.FitRuns(threads=1), log=lambda line: None)
    assert calls == ["p2-t2", "p2-t2"]  # the faster of two runs
    assert fitted["latency_us"] == pytest.approx(5000.0, rel=0.05)
    assert fitted["bandwidth_gbs"] == 40.0 and "fitted" in fitted["source"]
