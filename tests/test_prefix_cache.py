"""Prefix caching in the scheduling cores: named blocks, reference counts, sharing only what has
been written, and random workloads with shared prefixes under evictions, cancels, restarts and
phase switches (fake workers: tests/core_driver.py checks every plan)."""

from __future__ import annotations

import random

import pytest
import torch
from core_driver import EOS, Driver, token
from helpers import prompt_of

from seesaw.config import SchedulerConfig
from seesaw.kv.block_pool import ROOT_KEY, BlockPool, chain_key
from seesaw.kv.host_slots import HostSlots
from seesaw.runtime.step_inputs import BlockTables
from seesaw.sampling import SamplingParams
from seesaw.scheduling.decisions import Phase
from seesaw.scheduling.phases import PhaseScheduler
from seesaw.scheduling.request import NewRequest
from seesaw.scheduling.static import StaticScheduler


def chain(*blocks):
    keys, parent = [], ROOT_KEY
    for tokens in blocks:
        parent = chain_key(parent, tokens)
        keys.append((parent, tokens))
    return keys


# ------------------------------------------------------------ the pool


def test_a_cached_block_is_found_only_once_written_and_stays_until_the_pool_needs_it():
    pool = BlockPool(4)
    [a, b] = pool.allocate(2)
    entries = chain((1, 2), (3, 4))
    for block, (key, tokens), parent in zip([a, b], entries, [ROOT_KEY, entries[0][0]]):
        assert pool.name(block, key, parent, tokens)
    assert pool.match(entries) == ([], True)  # being written: not shared yet
    pool.cache([a, b])
    assert pool.match(entries) == ([a, b], False)
    pool.free([a, b])
    assert pool.num_used == 0 and pool.num_free == 4 and pool.is_idle(a)
    pool.hold([a])  # found again while idle
    assert pool.holders(a) == 1 and not pool.is_idle(a) and pool.num_free == 3
    pool.free([a])
    taken = pool.allocate(3)  # two never used, then the least recently released cached block
    assert taken == [2, 3, b]
    assert pool.match(entries) == ([a], False)  # b lost its name; a is still cached


def test_a_key_of_another_chain_is_a_miss_and_a_second_name_for_the_same_key_is_refused():
    pool = BlockPool(4)
    [a, b] = pool.allocate(2)
    key, tokens = chain((1, 2))[0]
    assert pool.name(a, key, ROOT_KEY, tokens)
    assert not pool.name(b, key, ROOT_KEY, tokens)  # b holds the same KV and stays unnamed
    pool.cache([a])
    assert pool.match([(key, (9, 9))]) == ([], False)  # same key, other tokens: a collision, no hit
    assert pool.match([(key, tokens)]) == ([a], False)


def test_counts_stay_exact_and_bad_frees_are_refused():
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    with pytest.raises(ValueError, match="neither held nor cached"):
        pool.hold([1])
    pool.free([a])
    with pytest.raises(ValueError, match="nobody holds it"):
        pool.free([a])


def test_a_block_whose_writing_never_finished_loses_its_name_when_let_go():
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    key, tokens = chain((5, 6))[0]
    pool.name(a, key, ROOT_KEY, tokens)
    pool.free([a])  # its request was cancelled before the step landed
    assert pool.match([(key, tokens)]) == ([], False) and pool.num_cached == 0


def test_forgetting_names_returns_idle_blocks_and_leaves_held_ones_with_their_holders():
    pool = BlockPool(3)
    [a, b] = pool.allocate(2)
    for block, (key, tokens) in zip([a, b], [chain((1,))[0], chain((2,))[0]]):
        pool.name(block, key, ROOT_KEY, tokens)
    pool.cache([a, b])
    pool.free([a])
    pool.forget_names()
    assert pool.num_cached == 0 and pool.holders(b) == 1 and pool.num_free == 2
    pool.free([b])
    assert pool.num_free == 3


# ------------------------------------------------------------ the cores


def static_core(num_blocks=64, block_size=4, budget=64, max_seqs=16, prefix_caching=True, host_blocks=0):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, watermark=0.0,
                             prefix_caching=prefix_caching)
    return StaticScheduler(config, num_blocks, block_size, 400, (EOS,), host=HostSlots(host_blocks, block_size))


def phase_core(num_blocks=64, host_blocks=64, block_size=4, budget=32, max_seqs=16, micro_batches=1):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, watermark=0.0)
    return PhaseScheduler(config, num_blocks, block_size, 400, (EOS,),
                          {Phase.PREFILL: micro_batches, Phase.DECODE: 1}, HostSlots(host_blocks, block_size))


def add(core, request_id, prompt, max_tokens=3):
    core.add(NewRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))


def land(core, plan):
    sampled = [token(row.request_id, row.sampling.output_index) for row in plan.rows if row.sampling]
    return core.complete(plan.step_id, sampled)


def test_a_request_starts_after_the_cached_blocks_of_a_prefix_another_request_computed():
    core = static_core()
    system = list(range(100, 112))  # three blocks of 4
    add(core, "first", system + [1, 2, 3])
    land(core, core.schedule())
    add(core, "second", system + [7, 8])
    plan = core.schedule()
    [decode, row] = plan.rows
    first = core.requests["first"]
    assert row.request_id == "second" and row.start == 12 and row.token_ids == [7, 8]
    assert row.new_block_ids[:3] == first.block_ids[:3] and row.first_new_block == 0
    assert core.counters["cached_tokens"] == 12
    assert all(core.pool.holders(block) == 2 for block in first.block_ids[:3])


def test_a_request_whose_prefix_is_being_computed_waits_for_that_step_then_shares_it():
    core = static_core()
    prompt = list(range(100, 117))  # four full blocks and one token
    add(core, "a", prompt)
    add(core, "b", prompt)
    first = core.schedule()
    assert [row.request_id for row in first.rows] == ["a"]
    assert not core.schedule().rows or all(row.request_id == "a" for row in core.schedule().rows)
    land(core, first)
    plan = core.schedule()
    row = next(row for row in plan.rows if row.request_id == "b")
    assert row.start == 16 and row.token_ids == [116]  # only its last token is computed


@pytest.mark.parametrize("length, hits", [(8, 1), (9, 2), (7, 1), (4, 0), (5, 1)])
def test_at_most_the_blocks_before_the_last_token_are_shared(length, hits):
    """A prompt equal to a block boundary computes its last block again (its last token's logits
    are needed); one a token past it shares every full block."""
    core = static_core()
    prompt = list(range(200, 200 + length))
    add(core, "a", prompt + [1, 2, 3, 4])
    land(core, core.schedule())
    add(core, "b", prompt)
    row = next(row for row in core.schedule().rows if row.request_id == "b")
    assert row.start == 4 * hits


def test_without_prefix_caching_every_prompt_is_computed():
    core = static_core(prefix_caching=False)
    prompt = list(range(100, 117))
    add(core, "a", prompt)
    land(core, core.schedule())
    add(core, "b", prompt)
    row = next(row for row in core.schedule().rows if row.request_id == "b")
    assert row.start == 0 and core.counters["cached_tokens"] == 0


def test_a_cancelled_request_leaves_the_shared_blocks_to_the_others():
    core = static_core()
    system = list(range(100, 112))
    add(core, "a", system + [1])
    land(core, core.schedule())
    add(core, "b", system + [2])
    add(core, "c", system + [3])
    plan = core.schedule()
    shared = core.requests["a"].block_ids[:3]
    assert all(core.pool.holders(block) == 3 for block in shared)
    core.stop("b")
    land(core, plan)
    assert all(core.pool.holders(block) == 2 for block in shared)
    assert core.requests["c"].block_ids[:3] == shared


def test_a_phase_switch_forgets_cached_blocks_so_a_prompt_after_it_computes_its_prefix_again():
    core = phase_core(num_blocks=32, host_blocks=8, block_size=4, budget=32)
    system = list(range(100, 112))
    driver = Driver(core, random.Random(0))
    add(core, "a", system + [1], max_tokens=4)
    driver.pump()
    driver.land_step()
    add(core, "b", system + [2], max_tokens=4)
    driver.pump()
    assert not any(row.request_id == "b" for plan in driver.steps for row in plan.rows)  # a's save is in flight
    driver.land_move()
    driver.pump()
    row = next(row for plan in driver.steps for row in plan.rows if row.request_id == "b")
    assert row.start == 12  # shared within the prefill phase
    assert core.host.get("b").num_shared == 3  # and a's saved blocks in the host buffer
    driver.run()
    assert core.counters["transitions"] >= 1
    add(core, "c", system + [3], max_tokens=4)
    if core.phase is Phase.DECODE:
        driver.pump()
    starts = [row.start for plan in driver.steps for row in plan.rows if row.request_id == "c"]
    assert starts[:1] == [0]  # the prefill layout's blocks were forgotten at the switch


# ------------------------------------------------------------ random workloads


def _restart(driver, make_core):
    """The replica is lost: its requests start over on a fresh core (as the engine restarts it)."""
    states = driver.core.take_all()
    core = make_core()
    core.adopt(states)
    driver.core = core
    driver.steps.clear()
    driver.moves.clear()
    driver.tables = BlockTables(torch.device("cpu"), mirrored=False)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["static", "seesaw"])
def test_random_workloads_with_shared_prefixes_keep_the_counts_exact(seed, mode):
    """Shared system prompts, prompts that are prefixes of others, evictions in small pools,
    cancels and a restart: every plan is checked (each block's holders equal the tables holding
    it, nothing freed is referenced, no shared block is written), and every request that was not
    cancelled gets the tokens it would get alone."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    if mode == "static":
        host_blocks = rng.choice([0, 400])

        def make_core():
            return static_core(num_blocks=rng.randint(30, 80), block_size=block_size, budget=rng.randint(8, 40),
                               max_seqs=rng.randint(2, 10), host_blocks=host_blocks)
    else:
        def make_core():
            return phase_core(num_blocks=rng.randint(40, 80), host_blocks=rng.randint(60, 120),
                              block_size=block_size, budget=rng.randint(8, 40), max_seqs=rng.randint(2, 10),
                              micro_batches=rng.choice([1, 2]))
    core = make_core()
    driver = Driver(core, rng)
    expected = {}
    for index in range(rng.randint(8, 24)):
        request_id = f"r{seed}-{index}"
        shared = rng.choice([0, 5, 12, 20])
        prompt = prompt_of(request_id, rng.randint(1, 30), shared)
        if rng.random() < 0.2 and expected:  # exactly another prompt, or a prefix of it
            other = core.requests[rng.choice(list(expected))].prompt_token_ids
            prompt = other[: rng.randint(1, len(other))]
        max_tokens = rng.randint(1, 12)
        if core.capacity_error(len(prompt), max_tokens) is None:
            add(core, request_id, prompt, max_tokens)
            expected[request_id] = [token(request_id, i) for i in range(max_tokens)]
    restart_at = rng.randint(5, 60) if rng.random() < 0.5 else None
    for event in range(100_000):
        driver.pump()
        if not driver.core.has_unfinished:
            break
        if event == restart_at:
            _restart(driver, make_core)
            continue
        if rng.random() < 0.03:
            victim = rng.choice(list(driver.core.requests))
            driver.core.stop(victim)
            expected.pop(victim, None)
            driver.outputs.pop(victim, None)
            continue
        choices = [c for c, queue in ((driver.land_step, driver.steps), (driver.land_move, driver.moves)) if queue]
        assert choices, "stalled: nothing in flight and nothing scheduled"
        rng.choice(choices)()
    assert not driver.core.has_unfinished
    for request_id, tokens in expected.items():
        assert driver.outputs[request_id] == tokens, request_id
    assert driver.core.pool.num_used == 0
    assert driver.core.pool.num_free == driver.core.pool.num_blocks
