"""The simulator drives the real scheduling cores: a small static schedule worked out by hand, the
same result for the same inputs, and seesaw pairs that finish every request."""

from __future__ import annotations

from dataclasses import replace

import pytest

from seesaw.config import SchedulerConfig
from seesaw.layout import Layout
from seesaw.sim.catalog import Catalog
from seesaw.sim.cost import CostModel, StepShape
from seesaw.sim.simulator import RunSpec, simulate
from seesaw.sim.workload import Workload, fixed

A, B = 1.0, 0.25  # the stub's stage time: A + B * new tokens


class LinearCost(CostModel):
    """Every pipeline stage takes A + B * (new tokens) seconds; nothing else costs anything."""

    def stage_times(self, layout: Layout, shape: StepShape) -> list[float]:
        return [A + B * shape.num_tokens] * layout.pp

    def send_s(self, shape: StepShape) -> float:
        return 0.0

    def device_blocks(self, layouts, block_size: int) -> int:
        return 100


def _stub(num_gpus: int = 2) -> LinearCost:
    catalog = Catalog()
    return LinearCost(catalog.model("tiny"), catalog.node(f"{num_gpus}xL4"))


def _two_requests() -> Workload:
    return Workload("two", ((4, 3), (4, 3)))


def test_t1_schedule_matches_hand_computation():
    # One step in flight. Step 0: r0's prompt (4 tokens; r1 arrives while it runs). Step 1: r0's
    # decode token and r1's prompt (5). Step 2: both decode (2). Step 3: r1's last token (1).
    one = RunSpec(Layout(), scheduler=SchedulerConfig(overlap=False))
    result = simulate(_stub(1), one, _two_requests())
    assert result.num_steps == 4
    assert result.elapsed_s == pytest.approx((A + 4 * B) + (A + 5 * B) + (A + 2 * B) + (A + 1 * B))
    assert result.output_tokens == 6 and result.num_failed == 0


def test_t1_schedule_with_two_steps_in_flight_matches_hand_computation():
    # Step 1 is planned with step 0, before r1 arrives: r0's row awaiting its first token (1).
    # Step 2 (once step 0 lands): r0's third token's row and r1's prompt (5). Step 3: r1 awaiting
    # (1; r0's last token is in flight, so nothing more for it). Step 4: r1's last (1).
    result = simulate(_stub(1), RunSpec(Layout()), _two_requests())
    assert result.num_steps == 5 and result.counters["rows_ahead"] == 4
    assert result.elapsed_s == pytest.approx((A + 4 * B) + (A + B) + (A + 5 * B) + (A + B) + (A + B))
    assert result.output_tokens == 6 and result.num_failed == 0


def test_p2_schedule_matches_hand_computation():
    # Two micro-batches of one request each: the prompts take s4 = A + 4B per stage, each decode
    # s1 = A + B. r0's prompt leaves stage 1 at 2*s4 and r1's at 3*s4; from then the two requests
    # alternate through the stages, four decode passes ending s1 apart: 3*s4 + 4*s1 in all.
    result = simulate(_stub(2), RunSpec(Layout(pp=2)), _two_requests())
    s4, s1 = A + 4 * B, A + B
    assert result.num_steps == 6
    assert result.elapsed_s == pytest.approx(3 * s4 + 4 * s1)


def test_same_inputs_same_result():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("4xA10"))
    spec = RunSpec(Layout(pp=4), Layout(tp=4), host_buffer_gb=8.0,
                   scheduler=SchedulerConfig(max_num_batched_tokens=4096))
    from seesaw.sim.workload import sharegpt

    first, second = (simulate(cost, spec, sharegpt(300, seed=3)) for _ in range(2))
    assert first.summary() == second.summary()
    assert first.timeline == second.timeline


def test_seesaw_pair_finishes_every_request_through_the_host_buffer():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("4xL4"))
    spec = RunSpec(Layout(pp=4), Layout(tp=4), host_buffer_gb=2.0)  # room for a few dozen requests
    result = simulate(cost, spec, fixed(200, 1000, 100))
    assert result.num_failed == 0
    assert result.counters["restores"] == 200  # every request came back from the host buffer
    assert len(result.transitions) >= 3  # the buffer filled more than once
    assert result.reload_s > 0
    assert result.host_peak_fraction > 0.9


def test_request_too_large_for_the_host_buffer_fails_alone():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xL4"))
    workload = Workload("mixed", ((100, 10), (60_000, 10), (100, 10)))
    result = simulate(cost, RunSpec(Layout(pp=2), Layout(tp=2), host_buffer_gb=1.0), workload)
    assert result.num_failed == 1
    assert result.output_tokens == 20


def test_a_request_longer_than_the_models_context_fails_as_the_engine_refuses_it():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama2-70b"), catalog.node("8xL4"))
    workload = Workload("mixed", ((100, 10), (4000, 97), (4000, 96)))  # the context is 4,096 tokens
    result = simulate(cost, RunSpec(Layout(tp=8), max_model_len=4096), workload)
    assert result.num_failed == 1 and result.output_tokens == 10 + 96


def test_layout_larger_than_the_node_is_refused():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xL4"))
    with pytest.raises(ValueError, match="needs 4 GPUs; the node has 2"):
        simulate(cost, RunSpec(Layout(tp=4)), fixed(1, 10, 10))
    with pytest.raises(ValueError, match=r"p2->t2: a prefill -> decode pair keeps KV in host memory .* \(0 GiB\)"):
        simulate(cost, RunSpec(Layout(pp=2), Layout(tp=2), host_buffer_gb=0.0), fixed(1, 10, 10))


def test_phase_seconds_are_the_time_steps_ran_and_the_waits_for_weights():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xL4"))
    result = simulate(cost, RunSpec(Layout(pp=2), Layout(tp=2), host_buffer_gb=1.0), fixed(100, 500, 50))
    assert set(result.phase_s) == {"prefill", "decode", "transition"}
    assert sum(result.phase_s.values()) <= result.elapsed_s + 1e-9  # idle time (waiting on copies) counts nowhere
    assert sum(result.phase_s.values()) > 0.9 * result.elapsed_s
    assert 0 < result.phase_s["transition"] <= result.reload_s * 2  # never more than the replica's workers reloaded


@pytest.mark.parametrize("run", ["t2", "p2-t2"])
def test_a_shared_system_prompt_is_computed_once_in_the_simulation_as_in_the_engine(run):
    from seesaw.sim.workload import with_shared_prefix

    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xL4"))
    spec = RunSpec.parse(run, host_buffer_gb=8.0, scheduler=SchedulerConfig(max_num_batched_tokens=4096))
    alone = fixed(64, 32, 16)
    shared = simulate(cost, spec, with_shared_prefix(alone, 1024))
    uncached = simulate(cost, replace(spec, scheduler=replace(spec.scheduler, prefix_caching=False)),
                        with_shared_prefix(alone, 1024))
    assert shared.num_failed == uncached.num_failed == 0
    assert shared.counters["cached_tokens"] >= 1024 * 60  # all but the first few found it cached
    assert uncached.counters["cached_tokens"] == 0
    assert shared.elapsed_s < uncached.elapsed_s
    # Without a shared prefix nothing is cached (and prompts share one list, as before).
    assert simulate(cost, spec, alone).counters["cached_tokens"] == 0
