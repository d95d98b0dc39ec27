"""Fake workers and a fake KV tier for driving a scheduling core in tests: steps land in order,
copies in order, the two interleaved at random; every plan is checked against the core's rules
(block deltas, the row and token caps, each block's holders counted exactly, no block written
while another request holds it)."""

from __future__ import annotations

import random
from collections import deque

import torch
from helpers import check_block_deltas, check_block_holders, prompt_of

from seesaw.config import SchedulerConfig
from seesaw.runtime.step_inputs import BlockTables
from seesaw.sampling import SamplingParams
from seesaw.scheduling.decisions import Phase, ToHost
from seesaw.scheduling.request import NewRequest
from seesaw.scheduling.static import StaticScheduler

EOS = 2


def token(request_id, index):
    """The fake model: a request's token at each output index."""
    return 100 + hash((request_id, index)) % 50


def add(core, request_id, prompt_len, max_tokens):
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    core.add(NewRequest(request_id, prompt_of(request_id, prompt_len), sampling))


class Driver:
    """Plays the workers and the KV tier: steps land in order (as a pipeline's do) and copies in
    order, the two interleaved at random."""

    def __init__(self, core, rng=None):
        self.core = core
        self.rng = rng or random.Random(0)
        self.steps: deque = deque()
        self.moves: deque = deque()
        self.outputs: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.switches: list[Phase] = []
        self.tables = BlockTables(torch.device("cpu"), mirrored=False)
        self.peak_rows = 0
        # A stand-in for the KV itself: per device block slot, the token whose KV it holds and the
        # layout (phase) that wrote it; per host block slot, the token (the host buffer's layout is
        # every layout's). Rows check every position they attend to, so a block shared, saved or
        # loaded wrongly shows.
        self.device_kv: dict[int, list] = {}
        self.host_kv: dict[int, list] = {}

    def pump(self):
        core = self.core
        while core.has_unfinished and core.num_in_flight_steps < core.max_in_flight_steps:
            plan = core.schedule()
            self.check_caps(plan)
            self.moves.extend(plan.moves)
            for move in plan.moves:
                self.check_move(move)
            if plan.rows:
                self.check_rows(plan)
                self.steps.append(plan)
            if plan.switch_to is not None:
                self.switches.append(plan.switch_to)
                continue
            if not plan.rows:
                return

    def check_caps(self, plan):
        """No step has more rows than max_num_seqs or more new tokens than the token budget, and
        no more requests run (or are on their way back to run) than max_num_seqs."""
        config = self.core.config
        assert len(plan.rows) <= config.max_num_seqs, f"{len(plan.rows)} rows in one step"
        num_tokens = sum(row.num_new_tokens for row in plan.rows)
        assert num_tokens <= config.max_num_batched_tokens, f"{num_tokens} tokens in one step"
        assert self.core.num_active <= config.max_num_seqs, f"{self.core.num_active} requests active"
        self.peak_rows = max(self.peak_rows, len(plan.rows))

    def check_rows(self, plan):
        phase = self.core.phase
        for row in plan.rows:
            state = self.core.requests[row.request_id]
            # Prefill rows only in the prefill phase, decode rows only in the decode phase.
            assert state.kv_phase is phase, f"{row} of a {state.kv_phase} request planned in the {phase} phase"
            if phase is Phase.DECODE:
                assert row.num_new_tokens == 1
        check_block_deltas(self.tables, self.core, plan)
        check_block_holders(self.core, plan, [row for step in self.steps for row in step.rows])

    def check_move(self, move):
        state = self.core.requests[move.request_id]
        expected = Phase.PREFILL if isinstance(move, ToHost) and state.kv_phase is Phase.PREFILL else state.kv_phase
        assert move.phase is expected

    def land_step(self):
        plan = self.steps.popleft()
        self.run_rows(plan)
        sampled = [token(row.request_id, row.sampling.output_index) for row in plan.rows if row.sampling]
        for update in self.core.complete(plan.step_id, sampled):
            self.outputs.setdefault(update.request_id, []).extend(update.token_ids)
            if update.finish_reason:
                self.finished.append(update.request_id)

    def run_rows(self, plan):
        """Each row reads the KV of every position before its own (which must be its request's
        tokens, in its layout) and writes its new positions'."""
        size = self.core.block_size
        empty = [None] * size
        for row in plan.rows:
            state = self.core.requests.get(row.request_id)
            if state is None:
                continue  # its replica was lost: the step never ran
            end = row.start + row.num_new_tokens
            tokens, table, layout = state.token_ids(0, end), state.block_ids, state.kv_phase
            if state.is_stopped:  # finished while the row was in flight: the token it awaits is dropped
                tokens += [None] * (end - len(tokens))
            for position in range(row.start):
                held = self.device_kv.get(table[position // size], empty)[position % size]
                assert held == (tokens[position], layout), (
                    f"{row.request_id} reads position {position} from block {table[position // size]}, which "
                    f"holds {held}, not {(tokens[position], layout)}")
            for position in range(row.start, end):
                self.device_kv.setdefault(table[position // size], list(empty))[position % size] = (tokens[position], layout)

    def land_move(self):
        move = self.moves.popleft()
        empty = [None] * self.core.block_size
        if isinstance(move, ToHost):
            for block, host_block in zip(move.block_ids, move.host_block_ids):
                self.host_kv[host_block] = [held and held[0] for held in self.device_kv.get(block, empty)]
            self.core.on_saved(move.request_id)
        else:
            for host_block, block in zip(move.host_block_ids, move.block_ids):
                self.device_kv[block] = [(held, move.phase) for held in self.host_kv.get(host_block, empty)]
            self.core.on_loaded(move.request_id)

    def run(self, max_events=100_000):
        for _ in range(max_events):
            self.pump()
            if not self.core.has_unfinished:
                return
            choices = [c for c, queue in ((self.land_step, self.steps), (self.land_move, self.moves)) if queue]
            assert choices, "stalled: nothing in flight and nothing scheduled"
            self.rng.choice(choices)()
        raise AssertionError("the run did not finish")


def reference_outputs(requests):
    """Each request's tokens from a static core with room for everything, one step at a time."""
    config = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=64, watermark=0.0)
    core = StaticScheduler(config, 10_000, 4, 400, (EOS,))
    for request_id, prompt_len, max_tokens in requests:
        add(core, request_id, prompt_len, max_tokens)
    outputs = {}
    while core.has_unfinished:
        plan = core.schedule()
        sampled = [token(row.request_id, row.sampling.output_index) for row in plan.rows if row.sampling]
        for update in core.complete(plan.step_id, sampled):
            outputs.setdefault(update.request_id, []).extend(update.token_ids)
    return outputs
