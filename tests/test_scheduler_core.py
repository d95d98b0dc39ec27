"""The static scheduling core, driven with fake model outputs: budgets, chunking, preemption, finishing."""

from __future__ import annotations

import random

import pytest
import torch

from seesaw.scheduling.request import NewRequest
from seesaw.sampling import SamplingParams
from seesaw.config import SchedulerConfig
from seesaw.kv.block_pool import BlockPool
from seesaw.kv.host_slots import HostSlots
from seesaw.scheduling.decisions import ToHost
from seesaw.scheduling.static import StaticScheduler
from seesaw.runtime.step_inputs import BlockTables
from helpers import check_block_deltas, check_block_holders, prompt_of

EOS = 2


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, max_model_len=200, watermark=0.0, host_blocks=1000):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, watermark=watermark)
    return StaticScheduler(config, num_blocks, block_size, max_model_len, (EOS,),
                           host=HostSlots(host_blocks, block_size))


def add(core, request_id, prompt_len, max_tokens, **fields):
    core.add(NewRequest(request_id, prompt_of(request_id, prompt_len),
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, **fields)))


class Model:
    """Plays the model and the KV tier: deterministic next tokens, instant KV moves, invariant checks."""

    def __init__(self, core, token=lambda request_id, index: 7):
        self.core = core
        self.token = token
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.num_evictions = 0
        self.num_restores = 0
        self.tables = BlockTables(torch.device("cpu"), mirrored=False)

    def step(self):
        plan = self.core.schedule()
        for move in plan.moves:
            if isinstance(move, ToHost):
                self.num_evictions += 1
                self.core.on_saved(move.request_id)
            else:
                self.num_restores += 1
                self.core.on_loaded(move.request_id)
        if not plan.rows:
            return plan
        self.check(plan)
        sampled = [self.token(row.request_id, row.sampling.output_index) for row in plan.rows if row.sampling]
        for update in self.core.complete(plan.step_id, sampled):
            self.outputs.setdefault(update.request_id, []).extend(update.token_ids)
            if update.finish_reason:
                self.finish[update.request_id] = update.finish_reason
        return plan

    def check(self, plan):
        assert sum(len(row.token_ids) for row in plan.rows) <= self.core.config.max_num_batched_tokens
        assert len({row.request_id for row in plan.rows}) == len(plan.rows)
        check_block_deltas(self.tables, self.core, plan)
        check_block_holders(self.core, plan)
        owned = {b for state in self.core.requests.values() for b in state.block_ids}
        assert len(owned) + self.core.pool.num_free == self.core.pool.num_blocks

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.core.has_unfinished:
                return
            self.step()
        raise AssertionError("the scheduler did not finish its requests")


def test_a_step_never_exceeds_the_token_budget_and_chunks_long_prompts():
    core = make(budget=16)
    add(core, "long", 40, 3)
    plan = core.schedule()
    assert [(row.start, len(row.token_ids), row.sampling) for row in plan.rows] == [(0, 16, None)]


def test_the_last_prefill_chunk_samples_and_decode_follows():
    core = make(budget=16)
    add(core, "a", 20, 3)
    model = Model(core)
    model.step()
    plan = model.step()
    assert [(row.start, len(row.token_ids)) for row in plan.rows] == [(16, 4)]
    assert plan.rows[0].sampling.output_index == 0
    plan = model.step()
    assert [(row.start, row.token_ids) for row in plan.rows] == [(20, [7])]


def test_requests_finish_by_length_stop_token_and_eos():
    core = make()
    add(core, "length", 5, 4)
    add(core, "eos", 5, 10)
    add(core, "ignore", 5, 3, ignore_eos=True)
    add(core, "stop-id", 5, 10, stop_token_ids=[9])

    def token(request_id, index):
        if request_id in ("eos", "ignore") and index == 1:
            return EOS
        return 9 if request_id == "stop-id" and index == 2 else 5

    model = Model(core, token)
    model.run()
    assert model.finish == {"length": "length", "eos": "stop", "ignore": "length", "stop-id": "stop"}
    assert [len(model.outputs[r]) for r in ("length", "eos", "ignore", "stop-id")] == [4, 2, 3, 3]
    assert core.pool.num_free == core.pool.num_blocks


def test_context_limit_finishes_with_length():
    core = make(max_model_len=12)
    add(core, "a", 10, 50)
    model = Model(core)
    model.run()
    assert model.finish == {"a": "length"} and len(model.outputs["a"]) == 2


def test_capacity_error_for_a_request_larger_than_the_pool():
    core = make(num_blocks=4, block_size=4)
    assert core.capacity_error(10, 6) is None
    assert "KV pool holds 4 blocks" in core.capacity_error(10, 7)


def test_a_block_pool_hands_out_fresh_ids_in_order_then_returned_ones_as_they_came_back():
    pool = BlockPool(6)
    assert pool.allocate(4) == [0, 1, 2, 3]
    pool.free([2, 0])
    assert (pool.num_free, pool.num_used) == (4, 2)
    assert pool.allocate(3) == [4, 5, 2] and pool.allocate(1) == [0]
    assert not pool.can_allocate(1)
    with pytest.raises(ValueError, match="asked for 1 blocks, 0 free"):
        pool.allocate(1)
    huge = BlockPool(10**12, "host KV buffer")  # ids not handed out cost nothing
    assert huge.allocate(2) == [0, 1] and huge.num_free == 10**12 - 2


def test_requests_may_share_one_prompt_list_which_the_core_leaves_as_it_was():
    def token(request_id, index):
        return 100 + (hash((request_id, index)) % 50)

    shared = list(range(10, 30))
    apart, together = Model(make(num_blocks=14), token), Model(make(num_blocks=14), token)
    for index in range(4):
        apart.core.add(NewRequest(f"r{index}", list(shared), SamplingParams(max_tokens=12, temperature=0.0)))
        together.core.add(NewRequest(f"r{index}", shared, SamplingParams(max_tokens=12, temperature=0.0)))
    apart.run()
    together.run()
    assert together.core.counters["evictions"] > 0
    assert together.outputs == apart.outputs and shared == list(range(10, 30))


def test_host_slots_remember_their_fullest_moment():
    host = HostSlots(10, block_size=4)
    host.store("a", 16)  # 4 blocks
    host.store("b", 9)  # 3 more
    host.release("a")
    host.store("c", 4)
    assert host.used_fraction == 0.4 and host.peak_fraction == 0.7
    assert HostSlots(0, block_size=4).peak_fraction == 0.0


@pytest.mark.parametrize("host_room", [True, False])
def test_preemption_under_a_small_pool_finishes_everything_with_the_same_tokens(host_room):
    def token(request_id, index):
        return 100 + (hash((request_id, index)) % 50)

    roomy = Model(make(num_blocks=400), token)
    tight = Model(make(num_blocks=14, host_blocks=1000 if host_room else 0), token)
    for model in (roomy, tight):
        for index in range(8):
            add(model.core, f"r{index}", 5 + 3 * index, 12)
        model.run()
    assert tight.core.counters["evictions"] > 0
    assert tight.outputs == roomy.outputs
    assert all(len(tokens) == 12 for tokens in tight.outputs.values())
    assert (tight.num_restores > 0) == host_room


def test_a_prompt_chunk_takes_what_the_free_blocks_hold_rather_than_evicting():
    core = make(num_blocks=8, block_size=4, budget=16)
    add(core, "decoding", 8, 6)
    add(core, "long", 30, 2)
    model = Model(core)
    first = model.step()
    assert [(row.request_id, len(row.token_ids)) for row in first.rows] == [("decoding", 8), ("long", 8)]
    second = model.step()  # 4 free blocks: one for the decode token, three (12 tokens) for the prompt
    assert [(row.request_id, row.num_new_tokens) for row in second.rows] == [("decoding", 1), ("long", 12)]
    assert not second.moves and core.counters["evictions"] == 0
    model.run()
    assert {r: len(t) for r, t in model.outputs.items()} == {"decoding": 6, "long": 2}


def test_stop_releases_blocks_now_or_when_the_step_lands():
    core = make()
    add(core, "a", 8, 10)
    add(core, "b", 8, 10)
    plan = core.schedule()
    core.stop("a")  # in flight: released when the step completes
    assert "a" in core.requests
    updates = core.complete(plan.step_id, [5, 5])
    assert [u.request_id for u in updates] == ["b"]
    assert "a" not in core.requests
    core.stop("b")
    assert core.pool.num_free == core.pool.num_blocks


def test_random_workloads_keep_every_invariant():
    rng = random.Random(0)
    for trial in range(30):
        core = make(num_blocks=rng.randint(12, 60), block_size=rng.choice([1, 2, 4, 8]),
                    budget=rng.randint(4, 40), max_seqs=rng.randint(1, 10))
        core.host = HostSlots(1000 if rng.random() < 0.5 else 0, core.block_size)
        model = Model(core)
        expected = {}
        for index in range(rng.randint(1, 12)):
            prompt, max_tokens = rng.randint(1, 30), rng.randint(1, 15)
            if core.capacity_error(prompt, max_tokens) is None:
                add(core, f"t{trial}-{index}", prompt, max_tokens)
                expected[f"t{trial}-{index}"] = max_tokens
        model.run()
        assert {r: len(t) for r, t in model.outputs.items()} == expected
        assert core.pool.num_free == core.pool.num_blocks


def test_a_swapped_request_as_large_as_the_pool_comes_back_when_alone():
    core = make(num_blocks=10, block_size=4, budget=16, watermark=0.1)
    add(core, "small", 1, 5)
    add(core, "large", 35, 3)
    model = Model(core)
    model.run(max_steps=200)
    assert len(model.outputs["large"]) == 3 and len(model.outputs["small"]) == 5
