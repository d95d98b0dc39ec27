"""Two steps in flight at one pipeline stage: the next step is planned while one runs, its decode rows
awaiting the tokens that one samples; every request gets exactly the tokens one step in flight gives."""

from __future__ import annotations

import random
from collections import deque

import torch
from helpers import check_block_deltas, prompt_of

from seesaw.config import SchedulerConfig
from seesaw.kv.host_slots import HostSlots
from seesaw.scheduling.request import NewRequest
from seesaw.runtime.step_inputs import BlockTables
from seesaw.scheduling.decisions import ToHost
from seesaw.scheduling.static import StaticScheduler
from seesaw.sampling import SamplingParams

EOS = 2


def token(request_id: str, index: int) -> int:
    """The model: a request's token at each output index; some requests meet EOS early."""
    value = random.Random(f"{request_id}/{index}").randrange(200)
    return EOS if value < 12 else 100 + value


class Workers:
    """Plays the workers and the KV tier: up to `max_in_flight_steps` steps in flight, landing in
    order; a row that awaits its token gets it from the step before, as a worker fills it in."""

    def __init__(self, core: StaticScheduler):
        self.core = core
        self.in_flight: deque = deque()
        self.tables = BlockTables(torch.device("cpu"), mirrored=False)
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.num_awaiting_rows = 0
        self.max_in_flight = 0

    def plan(self) -> bool:
        """Fill the pipeline; whether anything was planned (KV copies land at once)."""
        core = self.core
        planned = False
        while core.has_unfinished and core.num_in_flight_steps < core.max_in_flight_steps:
            plan = core.schedule()
            for move in plan.moves:
                (core.on_saved if isinstance(move, ToHost) else core.on_loaded)(move.request_id)
            planned |= not plan.is_empty
            if not plan.rows:
                return planned
            check_block_deltas(self.tables, core, plan)
            before = {row.request_id for row in self.in_flight[-1].rows if row.sampling} if self.in_flight else set()
            for row in plan.rows:
                if row.awaits_token:
                    assert row.request_id in before, "a row awaits a token the step before does not sample"
                    self.num_awaiting_rows += 1
            self.in_flight.append(plan)
            self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        return planned

    def land(self) -> None:
        plan = self.in_flight.popleft()
        sampled = [token(row.request_id, row.sampling.output_index) for row in plan.rows if row.sampling]
        for update in self.core.complete(plan.step_id, sampled):
            assert update.request_id not in self.finish, f"{update.request_id} got a token after it finished"
            self.outputs.setdefault(update.request_id, []).extend(update.token_ids)
            if update.finish_reason:
                self.finish[update.request_id] = update.finish_reason

    def run(self, max_steps: int = 20_000) -> None:
        for _ in range(max_steps):
            planned = self.plan()
            if not self.core.has_unfinished:
                return
            if self.in_flight:
                self.land()
            else:
                assert planned, "stalled with requests left"
        raise AssertionError("the run did not finish")


def make(overlap: bool, num_blocks=48, block_size=4, budget=24, max_seqs=8, max_model_len=60, host_blocks=200):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, watermark=0.0, overlap=overlap)
    return StaticScheduler(config, num_blocks, block_size, max_model_len, (EOS,),
                           host=HostSlots(host_blocks, block_size))


def add(core, request_id, prompt_len, max_tokens, seed=None):
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed)
    core.add(NewRequest(request_id, prompt_of(request_id, prompt_len), sampling))


def run(overlap: bool, requests, **sizes) -> Workers:
    core = make(overlap, **sizes)
    for request in requests:
        add(core, *request)
    workers = Workers(core)
    workers.run()
    assert core.pool.num_free == core.pool.num_blocks and not core.requests
    return workers


def test_two_steps_in_flight_give_the_outputs_of_one():
    # Long prompts chunked by the budget, EOS at random, max_tokens and the model's length limit.
    requests = [(f"r{i}", 3 + 7 * i % 40, 4 + 5 * i % 17) for i in range(12)]
    one = run(False, requests)
    two = run(True, requests)
    assert one.max_in_flight == 1 and two.max_in_flight == 2
    assert two.num_awaiting_rows > 0
    assert two.outputs == one.outputs and two.finish == one.finish
    assert set(one.finish) == {r[0] for r in requests}


def test_random_workloads_with_evictions_keep_their_outputs():
    rng = random.Random(1)
    for trial in range(25):
        sizes = dict(num_blocks=rng.randint(16, 48), block_size=rng.choice([1, 2, 4]), budget=rng.randint(4, 32),
                     max_seqs=rng.randint(1, 8), host_blocks=rng.choice([0, 400]))
        requests = []
        probe = make(False, **sizes)
        for index in range(rng.randint(1, 10)):
            prompt, max_tokens = rng.randint(1, 20), rng.randint(1, 14)
            if probe.capacity_error(prompt, max_tokens) is None:
                requests.append((f"t{trial}-{index}", prompt, max_tokens))
        one = run(False, requests, **sizes)
        two = run(True, requests, **sizes)
        assert two.outputs == one.outputs and two.finish == one.finish, f"trial {trial}"


def test_a_request_finished_by_the_step_in_flight_gives_no_more_tokens_and_frees_its_blocks():
    core = make(True)
    add(core, "a", 4, 10)
    first = core.schedule()  # the prompt, sampling token 0
    second = core.schedule()  # token 1's row, awaiting token 0
    assert second.rows[0].awaits_token and second.rows[0].token_ids == []
    assert second.rows[0].sampling.output_index == 1
    updates = core.complete(first.step_id, [EOS])
    assert [(u.token_ids, u.finish_reason) for u in updates] == [([EOS], "stop")]
    assert core.pool.num_used > 0  # the row in flight still writes its KV
    assert core.complete(second.step_id, [77]) == []
    assert core.pool.num_free == core.pool.num_blocks and not core.requests


def test_no_row_runs_past_max_tokens_or_the_model_length():
    core = make(True, max_model_len=8)
    add(core, "short", 3, 2)  # its second token is its last
    add(core, "long", 6, 50)  # reaches the model's length after two tokens
    plan = core.schedule()
    ahead = core.schedule()
    assert {row.request_id for row in ahead.rows} == {"short", "long"}
    core.complete(plan.step_id, [50, 51])
    assert core.schedule().rows == []  # both finish with the tokens in flight: nothing to run ahead
    updates = core.complete(ahead.step_id, [60, 61])
    assert {u.request_id: u.finish_reason for u in updates} == {"short": "length", "long": "length"}


def test_a_stop_while_two_rows_are_in_flight_waits_for_both():
    core = make(True)
    add(core, "a", 4, 10)
    first, second = core.schedule(), core.schedule()
    core.stop("a")
    assert core.complete(first.step_id, [50]) == [] and "a" in core.requests
    assert core.complete(second.step_id, [51]) == []
    assert core.pool.num_free == core.pool.num_blocks and not core.requests
