"""The seesaw phase machine, driven with fake model outputs and fake KV copies: when it switches,
what it keeps on the device, and that every request finishes once with the tokens a static run gives."""

from __future__ import annotations

import random

import pytest
from core_driver import EOS, Driver, add, reference_outputs

from seesaw.config import SchedulerConfig
from seesaw.kv.host_slots import HostSlots
from seesaw.scheduling.decisions import Phase, ToHost
from seesaw.scheduling.phases import PhaseScheduler
from seesaw.scheduling.request import RequestStatus


def make(num_blocks=64, host_blocks=32, block_size=4, budget=32, max_seqs=16, low_water=0.2, micro_batches=1,
         max_model_len=400, watermark=0.0):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, watermark=watermark,
                             host_low_water=low_water)
    depth = {Phase.PREFILL: micro_batches, Phase.DECODE: 1}
    return PhaseScheduler(config, num_blocks, block_size, max_model_len, (EOS,), depth,
                          HostSlots(host_blocks, block_size))


def test_with_nothing_to_do_it_stays_in_prefill_and_plans_nothing():
    core = make()
    plan = core.schedule()
    assert plan.is_empty and core.phase is Phase.PREFILL


def test_a_request_that_can_never_fit_the_host_buffer_or_the_pool_is_refused_with_the_reason():
    core = make(num_blocks=64, host_blocks=8, block_size=4)
    assert core.capacity_error(20, 12) is None
    assert "host KV buffer holds 8 blocks per replica" in core.capacity_error(20, 13)
    assert "device KV pool holds 64 blocks" in make(num_blocks=64, host_blocks=1000).capacity_error(200, 100)


def test_prefill_runs_until_the_host_buffer_cannot_take_the_next_prompt():
    core = make(host_blocks=10, block_size=4, budget=64)  # room for three 12-token prompts
    for index in range(5):
        add(core, f"r{index}", 12, 4)
    plan = core.schedule()
    assert [row.request_id for row in plan.rows] == ["r0", "r1", "r2"]
    # The last prefills are in flight and the next prompt cannot fit: switch now, do not wait.
    plan = core.schedule()
    assert plan.switch_to is Phase.DECODE and not plan.rows
    updates = core.complete(0, [7, 7, 7])
    assert [u.token_ids for u in updates] == [[7], [7], [7]]
    plan = core.schedule()
    assert sorted(m.request_id for m in plan.moves) == ["r0", "r1", "r2"]
    assert all(isinstance(m, ToHost) and m.phase is Phase.PREFILL for m in plan.moves)


def test_with_nothing_waiting_it_leaves_prefill_only_once_the_last_steps_land():
    core = make()
    add(core, "a", 8, 4)
    plan = core.schedule()
    assert core.schedule().switch_to is None  # more of the batch may still be arriving
    add(core, "b", 8, 4)
    assert [row.request_id for row in core.schedule().rows] == ["b"]
    core.complete(plan.step_id, [5])
    core.complete(plan.step_id + 1, [5])
    assert core.schedule().switch_to is Phase.DECODE


def test_a_prompt_with_a_chunk_in_flight_keeps_the_replica_in_prefill():
    core = make(budget=16, host_blocks=12, micro_batches=2)
    add(core, "long", 40, 4)
    add(core, "blocked", 20, 4)  # 40 + 20 tokens do not fit 12 host blocks of 4
    first = core.schedule()
    assert [(row.request_id, row.start, len(row.token_ids)) for row in first.rows] == [("long", 0, 16)]
    assert core.schedule().switch_to is None  # 24 tokens of "long" are still to prefill
    core.complete(first.step_id, [])
    assert [(row.start, len(row.token_ids)) for row in core.schedule().rows] == [(16, 16)]


def test_a_drained_host_buffer_brings_waiting_prompts_in_and_pauses_decoding_requests_in_place():
    core = make(num_blocks=64, host_blocks=20, block_size=4)
    driver = Driver(core)
    for index in range(3):
        add(core, f"r{index}", 8, 50)
    while not core.running or core.phase is not Phase.DECODE:  # prefill, copy out, load, decode
        driver.pump()
        (driver.land_step if driver.steps else driver.land_move)()
    driver.pump()
    driver.land_step()
    resident = {s.request_id: list(s.block_ids) for s in core.running}
    assert core.host.used_fraction <= 0.2
    add(core, "late", 8, 4)
    plan = core.schedule()
    assert plan.switch_to is Phase.PREFILL
    assert {s.request_id for s in core.paused} == set(resident)
    assert all(s.status is RequestStatus.PAUSED for s in core.paused)
    plan = core.schedule()
    assert [row.request_id for row in plan.rows] == ["late"] and not plan.moves  # nobody is evicted
    assert {s.request_id: s.block_ids for s in core.paused} == resident
    driver.steps.append(plan)
    driver.run()
    assert sorted(driver.finished) == ["late", "r0", "r1", "r2"]


def test_a_prompt_the_paused_requests_leave_no_room_for_moves_the_latest_of_them_to_the_host_buffer():
    core = make(num_blocks=16, host_blocks=40, block_size=4, budget=16)
    driver = Driver(core)
    requests = [(f"r{index}", 8, 40) for index in range(3)] + [("late0", 16, 4), ("late1", 16, 4)]
    for request in requests[:3]:
        add(core, *request)
    while len(core.running) < 3 or any(len(s.output_token_ids) < 2 for s in core.running):
        driver.pump()
        (driver.land_move if driver.moves else driver.land_step)()
    while driver.steps:
        driver.land_step()
    held = {s.request_id: len(s.block_ids) for s in core.running}
    assert held == {"r0": 3, "r1": 3, "r2": 3} and core.pool.num_free == 7
    for request in requests[3:]:
        add(core, *request)
    assert core.schedule().switch_to is Phase.PREFILL  # room for one prompt of 4 blocks
    first = core.schedule()
    assert [row.request_id for row in first.rows] == ["late0"] and not first.moves
    second = core.schedule()  # late1 needs 4 blocks and 3 are free: the latest paused request leaves
    assert not second.rows and [(type(m), m.request_id, m.phase) for m in second.moves] == [
        (ToHost, "r2", Phase.DECODE)]
    assert core.requests["r2"].status is RequestStatus.EVICTING and [s.request_id for s in core.paused] == ["r0", "r1"]
    core.on_saved("r2")
    third = core.schedule()
    assert [row.request_id for row in third.rows] == ["late1"]
    assert core.counters["evictions"] == core.counters["paused_to_host"] == 1
    driver.steps.extend([first, third])
    driver.run()
    assert sorted(driver.finished) == sorted(r for r, _, _ in requests)
    assert driver.outputs == reference_outputs(requests)
    assert core.pool.num_free == core.pool.num_blocks and core.host.num_free_blocks == core.host.num_blocks


def test_decode_waits_for_blocks_rather_than_loading_more_when_a_prompt_could_start():
    core = make(num_blocks=8, host_blocks=64, block_size=4, low_water=0.5)
    core.phase = Phase.DECODE
    add(core, "waiting", 20, 4)  # needs 5 blocks
    core.waiting[0].status = RequestStatus.WAITING
    holder = core.waiting.popleft()
    core.requests.pop("waiting")
    add(core, "running", 12, 10)
    running = core.waiting.popleft()
    running.block_ids, running.num_computed_tokens = core.pool.allocate(4), 12
    running.output_token_ids, running.status, running.kv_phase = [7], RequestStatus.RUNNING, Phase.DECODE
    core.running.append(running)
    add(core, "swapped", 8, 4)
    swapped = core.waiting.popleft()
    swapped.num_computed_tokens, swapped.output_token_ids = 8, [7]
    swapped.status = RequestStatus.SWAPPED
    core.host.store("swapped", 8)
    core.swapped.append(swapped)
    core.waiting.append(holder)
    core.requests["waiting"] = holder
    plan = core.schedule()  # 4 blocks free, the prompt needs 5: no switch, and no load either
    assert plan.switch_to is None and not plan.moves and [r.request_id for r in plan.rows] == ["running"]


def test_a_request_stopped_while_its_kv_is_copied_out_gives_back_its_host_slot_and_blocks():
    core = make(host_blocks=32)
    add(core, "a", 8, 4)
    plan = core.schedule()
    core.complete(plan.step_id, [5])  # prefilled: its KV is to go to the host
    plan = core.schedule()
    assert [type(move) for move in plan.moves] == [ToHost]
    core.stop("a")  # a stop string matched the first token while the copy is in flight
    assert "a" in core.requests
    core.on_saved("a")
    assert "a" not in core.requests
    assert core.host.num_free_blocks == 32 and core.pool.num_free == core.pool.num_blocks


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_finish_every_request_once_with_static_tokens(seed):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    core = make(num_blocks=rng.randint(24, 60), host_blocks=rng.randint(24, 80), block_size=block_size,
                budget=rng.randint(8, 40), max_seqs=rng.randint(2, 12), low_water=rng.choice([0.0, 0.2, 0.5]),
                micro_batches=rng.choice([1, 2]), watermark=rng.choice([0.0, 0.01, 0.05, 0.1]))
    requests = []
    for index in range(rng.randint(5, 25)):
        prompt_len, max_tokens = rng.randint(1, 40), rng.randint(1, 20)
        if core.capacity_error(prompt_len, max_tokens) is None:
            requests.append((f"s{seed}-{index}", prompt_len, max_tokens))
    driver = Driver(core, rng)
    for request in requests:
        add(core, *request)
    driver.run()
    assert sorted(driver.finished) == sorted(r for r, _, _ in requests)
    assert driver.outputs == reference_outputs(requests)
    assert core.pool.num_free == core.pool.num_blocks and core.host.num_free_blocks == core.host.num_blocks
    assert driver.switches.count(Phase.DECODE) >= 1


def test_many_switches_when_the_host_buffer_is_small_and_the_last_long_requests_do_not_stall():
    core = make(num_blocks=40, host_blocks=16, block_size=4, budget=16)
    requests = [(f"r{i}", 10, 6) for i in range(12)] + [("long-a", 50, 10), ("long-b", 45, 12)]
    driver = Driver(core)
    for request in requests:
        add(core, *request)
    driver.run()
    assert sorted(driver.finished) == sorted(r for r, _, _ in requests)
    assert driver.outputs == reference_outputs(requests)
    assert len(driver.switches) >= 5
