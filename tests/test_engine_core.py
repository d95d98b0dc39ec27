"""The engine core, the one driver of the scheduling cores that the Scheduler actor and the
simulator share: events in, effects out, on a clock the test turns."""

from __future__ import annotations

from seesaw.config import SchedulerConfig
from seesaw.layout import Layout
from seesaw.scheduling.decisions import Phase, ToHost
from seesaw.scheduling.engine_core import (
    EngineCore,
    ModelLimits,
    Refused,
    ReshardFinished,
    StartMove,
    StartReshard,
    StartStep,
    Tokens,
)
from seesaw.scheduling.request import NewRequest
from seesaw.sampling import SamplingParams

LIMITS = ModelLimits(block_size=4, max_model_len=256, eos_token_ids=(2,), num_host_blocks=64)


def _core(layouts, **config) -> tuple[EngineCore, list[float]]:
    clock = [0.0]
    core = EngineCore(SchedulerConfig(max_num_batched_tokens=64, **config), layouts, LIMITS, lambda: clock[0])
    return core, clock


def _request(request_id: str, prompt_len: int = 8, max_tokens: int = 4) -> NewRequest:
    return NewRequest(request_id, [7] * prompt_len, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def _kinds(effects) -> list[str]:
    return [type(effect).__name__ for effect in effects]


def test_requests_that_arrive_before_the_workers_wait_then_go_to_the_replica_with_least_to_run():
    core, _ = _core({Phase.MIXED: Layout(dp=2)}, overlap=False)
    assert core.add(_request("early", 40, 20)) == []
    effects = core.ready([100, 100])  # the early request goes to replica 0 and starts at once
    assert [(type(e).__name__, e.replica) for e in effects] == [("StartStep", 0)]
    placed = core.add(_request("next", 8, 4))  # replica 1 has nothing to run: it takes the next one
    assert [(type(e).__name__, e.replica) for e in placed] == [("StartStep", 1)]
    assert core.num_requests() == (2, 0)


def test_a_request_no_replica_can_hold_is_refused_as_invalid():
    core, _ = _core({Phase.MIXED: Layout()})
    core.ready([10])
    (refused,) = core.add(_request("huge", 100, 100))
    assert isinstance(refused, Refused) and refused.is_invalid and "device KV pool holds 10 blocks" in refused.reason


def test_a_step_done_reports_tokens_and_plans_the_next_step():
    core, clock = _core({Phase.MIXED: Layout()}, overlap=False)
    core.ready([100])
    (first,) = core.add(_request("a", 8, 2))
    clock[0] = 1.0
    effects = core.step_done(0, first.plan.step_id, [5], compute_ms=3.0)
    assert _kinds(effects) == ["Tokens", "StartStep"]
    assert effects[0] == Tokens(effects[0].updates) and effects[0].updates[0].token_ids == [5]
    assert core.stats().totals.generated_tokens == 1 and core.compute_ms == 3.0
    assert core.stats().run.phase_seconds == {"mixed": 1.0}


def test_a_switch_starts_a_reshard_that_ends_when_every_worker_of_the_replica_reports():
    core, _ = _core({Phase.PREFILL: Layout(pp=2), Phase.DECODE: Layout(tp=2)}, overlap=False)
    core.ready([100])
    (prefill,) = core.add(_request("a", 8, 3))
    effects = core.step_done(0, prefill.plan.step_id, [5])  # prefilled: its KV goes out, then decode
    moves = [e for e in effects if isinstance(e, StartMove)]
    reshards = [e for e in effects if isinstance(e, StartReshard)]
    assert [type(m.move) for m in moves] == [ToHost] and reshards == [StartReshard(0, Layout(tp=2), 0)]
    assert core.resharded(0, 0.0, 0.1, 100) == []  # rank 1 is still loading
    assert core.resharded(1, 0.0, 0.2, 100) == [ReshardFinished(0, 0, True)]
    assert core.metrics.transitions[0].load_s == 0.2 and core.metrics.transitions[0].num_bytes == 200


def test_a_lost_replica_keeps_its_requests_with_their_tokens_for_its_next_workers():
    core, _ = _core({Phase.MIXED: Layout()}, overlap=False)
    core.ready([100])
    (step,) = core.add(_request("a", 8, 4))
    core.step_done(0, step.plan.step_id, [5])
    assert core.replica_lost(0) == {"a"}
    assert core.step_done(0, step.plan.step_id + 1, [6]) == []  # a late answer from the old workers
    assert core.num_requests() == (0, 1)
    effects = core.replica_ready(0, 100)
    (restart,) = [e for e in effects if isinstance(e, StartStep)]
    assert restart.plan.rows[0].token_ids == [7] * 8 + [5]  # recomputed with the token it had made
    assert restart.plan.step_id > step.plan.step_id  # step ids go on: late answers stay unmatched


def test_a_replica_lost_for_good_hands_its_requests_to_the_others_with_their_tokens():
    core, _ = _core({Phase.MIXED: Layout(dp=2)}, overlap=False)
    core.ready([100, 100])
    (first,) = core.add(_request("a", 8, 4))
    other = NewRequest("b", [8] * 8, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    (second,) = core.add(other)  # a prompt of its own: nothing of it is in replica 0's prefix cache
    assert (first.replica, second.replica) == (0, 1)
    core.step_done(1, second.plan.step_id, [5])
    assert core.replica_lost(1) == {"b"}
    effects = core.hand_over(1)
    assert core.replica_of("b") == 0 and core.num_held(1) == 0 and not core.is_up(1)
    assert core.step_done(1, second.plan.step_id + 1, [6]) == []  # a late answer from the lost workers
    effects += core.step_done(0, first.plan.step_id, [9])  # replica 0 now runs both
    rows = {row.request_id: row for effect in effects if isinstance(effect, StartStep) for row in effect.plan.rows}
    assert set(rows) == {"a", "b"}
    assert rows["b"].token_ids[:9] == [8] * 8 + [5]  # recomputed with the token it had made
    core.add(_request("c", 8, 4))
    assert core.replica_of("c") == 0  # new requests skip the lost replica
    # With no replica up, a lost one's requests wait; its workers joining again bring it back.
    core.replica_lost(0)
    assert core.hand_over(0) == [] and core.num_held(0) == 3
    assert not [e for e in core.replica_ready(1, 100) if isinstance(e, StartStep)] and core.is_up(1)
    assert [e.replica for e in core.hand_over(0) if isinstance(e, StartStep)] == [1]
    assert {core.replica_of(r) for r in "abc"} == {1} and sum(core.num_requests()) == 3


def test_a_failed_engine_drops_every_request_and_takes_no_more():
    core, _ = _core({Phase.MIXED: Layout()})
    core.ready([100])
    core.add(_request("a"))
    core.fail("worker 0 died")
    assert core.num_requests() == (0, 0) and core.add(_request("b")) == []
    assert core.stats().failure == "worker 0 died"
