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
         max_model_len=400, watermark=0.0, prefetch=True, min_fill=0.1):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, watermark=watermark,
                             host_low_water=low_water, prefetch=prefetch, prefill_min_fill=min_fill)
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
    core = make(num_blocks=16, host_blocks=40, block_size=4, budget=16, prefetch=False)
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
    driver.moves.extend(second.moves)
    driver.land_move()
    third = core.schedule()
    assert [row.request_id for row in third.rows] == ["late1"]
    assert core.counters["evictions"] == core.counters["paused_to_host"] == 1
    driver.steps.extend([first, third])
    driver.run()
    assert sorted(driver.finished) == sorted(r for r, _, _ in requests)
    assert driver.outputs == reference_outputs(requests)
    assert core.pool.num_free == core.pool.num_blocks and core.host.num_free_blocks == core.host.num_blocks


def test_decode_waits_for_blocks_rather_than_loading_more_when_a_prompt_could_start():
    core = make(num_blocks=8, host_blocks=64, block_size=4, low_water=0.5, min_fill=0.0)
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
                micro_batches=rng.choice([1, 2]), watermark=rng.choice([0.0, 0.01, 0.05, 0.1]),
                prefetch=rng.choice([True, False]), min_fill=rng.choice([0.0, 0.1, 0.5]))
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


def _trickle(min_fill: float, max_wait_s: float) -> tuple[int, list[str]]:
    """Four long requests decode while a short prompt arrives every 0.5 s for 20 s (each step
    takes 0.05 s); returns the transitions and which requests finished."""
    clock = [0.0]
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16, watermark=0.0,
                             prefill_min_fill=min_fill, prefill_max_wait_s=max_wait_s)
    core = PhaseScheduler(config, 200, 4, 2000, (EOS,), {Phase.PREFILL: 2, Phase.DECODE: 1},
                          HostSlots(400, 4), clock=lambda: clock[0])
    driver = Driver(core)
    for index in range(4):
        add(core, f"long{index}", 16, 600)
    arrivals = [(0.5 * (i + 1), f"short{i}") for i in range(40)]
    while core.has_unfinished or arrivals:
        while arrivals and arrivals[0][0] <= clock[0]:
            add(core, arrivals.pop(0)[1], 12, 8)
        driver.pump()
        if driver.moves:
            driver.land_move()
        elif driver.steps:
            driver.land_step()
            clock[0] += 0.05
        else:
            clock[0] = arrivals[0][0]  # idle until the next arrival
    return len(driver.switches), driver.finished


def test_a_trickle_of_prompts_waits_for_a_batch_worth_two_reshards():
    eager_switches, eager_finished = _trickle(min_fill=0.0, max_wait_s=0.0)
    switches, finished = _trickle(min_fill=0.1, max_wait_s=4.0)
    assert sorted(finished) == sorted(eager_finished) and len(finished) == 44
    assert eager_switches >= 50  # most arrivals: a prefill phase and a decode phase for each
    # A prefill phase at most every 4 s of the 20 while decode has work: a handful of pairs.
    assert switches <= 12


def test_once_no_prompt_can_start_prefetched_requests_load_in_the_decode_layout_before_the_switch():
    core = make(num_blocks=64, host_blocks=64, block_size=4, budget=8, micro_batches=2)
    add(core, "first", 8, 4)
    add(core, "second", 8, 4)
    first = core.schedule()
    second = core.schedule()
    assert [r.request_id for r in first.rows] == ["first"] and [r.request_id for r in second.rows] == ["second"]
    core.complete(first.step_id, [7])  # "first" is prefilled; "second" is still in the pipeline
    save = core.schedule()
    assert [(type(m), m.request_id) for m in save.moves] == [(ToHost, "first")] and save.switch_to is None
    core.on_saved("first")
    plan = core.schedule()  # nothing waits: "first" loads in the decode layout while "second" runs
    assert [(type(m).__name__, m.request_id, m.phase) for m in plan.moves] == [("ToDevice", "first", Phase.DECODE)]
    assert plan.switch_to is None and core.phase is Phase.PREFILL
    core.on_loaded("first")
    assert core.requests["first"].status is RequestStatus.PAUSED and "first" in core.host  # host copy kept
    core.complete(second.step_id, [7])
    plan = core.schedule()
    assert plan.switch_to is Phase.DECODE and "first" not in core.host  # released once decode starts
    assert core.counters["prefetches"] == 1


def test_a_prefetched_request_a_new_prompt_needs_room_from_leaves_without_a_copy():
    core = make(num_blocks=8, host_blocks=64, block_size=4, budget=8, micro_batches=2)
    add(core, "a", 8, 4)
    add(core, "busy", 8, 4)
    first, second = core.schedule(), core.schedule()
    core.complete(first.step_id, [7])
    core.schedule()  # "a" goes to the host buffer
    core.on_saved("a")
    core.schedule()  # nothing waits: "a" comes back for decode while "busy" is in the pipeline
    core.on_loaded("a")
    assert core.requests["a"].status is RequestStatus.PAUSED and core.pool.num_free == 3
    add(core, "b", 20, 4)  # 5 blocks: it needs the prefetched request's
    plan = core.schedule()
    assert not plan.moves and core.requests["a"].status is RequestStatus.SWAPPED and "a" in core.host
    assert core.pool.num_free == 6
    core.complete(second.step_id, [7])
    assert "b" in [r.request_id for r in core.schedule().rows]


def _four_decoding_on_a_full_device(**settings):
    """Four requests decoding with five blocks each on a pool of 24 (4 free), prefill in two stages."""
    core = make(num_blocks=24, host_blocks=200, block_size=4, budget=16, micro_batches=2, prefetch=False,
                min_fill=0.0, **settings)
    driver = Driver(core)
    for index in range(4):
        add(core, f"r{index}", 16, 40)
    while len(core.running) < 4 or core.phase is not Phase.DECODE or any(len(s.output_token_ids) < 2 for s in core.running):
        driver.pump()
        (driver.land_move if driver.moves else driver.land_step)()
    while driver.steps:
        driver.land_step()
    assert core.pool.num_free == 4
    return core, driver


def test_paused_requests_leave_for_a_full_pipeline_of_prompts_and_small_steps_wait_for_them():
    core, driver = _four_decoding_on_a_full_device()
    for index in range(4):
        add(core, f"late{index}", 16, 4)  # four blocks each, one step's budget each
    assert core.schedule().switch_to is Phase.PREFILL
    first = core.schedule()
    assert [row.request_id for row in first.rows] == ["late0"] and core.pool.num_free == 0
    # Room for the next two prompts (one per stage), not for one: the two latest paused requests go.
    making_room = core.schedule()
    assert not making_room.rows and [m.request_id for m in making_room.moves] == ["r3", "r2"]
    assert core.schedule().is_empty  # a step now could hold nothing; it waits for the copies to land
    driver.moves.extend(making_room.moves)
    driver.land_move()  # r3's copy, then r2's
    driver.land_move()
    second, third = core.schedule(), core.schedule()
    assert [row.request_id for row in second.rows] == ["late1"] and [row.request_id for row in third.rows] == ["late2"]
    driver.steps.extend([first, second, third])
    driver.run()
    assert sorted(driver.finished) == [f"late{i}" for i in range(4)] + [f"r{i}" for i in range(4)]


def test_in_decode_the_prompts_waiting_for_prefill_do_not_unbalance_the_micro_batches():
    core = make(num_blocks=400, host_blocks=400, block_size=4, budget=64, min_fill=0.5, max_seqs=64)
    core.micro_batches = {Phase.PREFILL: 1, Phase.DECODE: 2}
    driver = Driver(core)
    for index in range(8):
        add(core, f"r{index}", 8, 30)
    while core.phase is not Phase.DECODE or len(core.running) < 8:
        driver.pump()
        (driver.land_move if driver.moves else driver.land_step)()
    for index in range(40):
        add(core, f"late{index}", 4, 2)  # a little under half the buffer: not yet worth a prefill phase
    while driver.steps:
        driver.land_step()
    assert [len(core.schedule().rows), len(core.schedule().rows)] == [4, 4]
