"""The engine's core (pure): a scheduling core per data-parallel replica, where each new request
goes, what runs next, and the run's books.

It takes events (a request added or stopped, a step done, a KV copy done, a worker re-sharded, a
replica lost or back, the engine failed) and returns effects (start a step, a KV move or a
re-shard; report tokens; fail a request). The Scheduler actor turns messages into events and
effects into messages; the simulator feeds the same core from its event queue and models the
workers, so it predicts the code that runs, never a copy of it. The caller supplies the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from seesaw.config import SchedulerConfig
from seesaw.kv.host_slots import HostSlots, split_host_blocks
from seesaw.layout import Layout
from seesaw.scheduling.decisions import Phase, StepPlan, ToDevice, ToHost
from seesaw.scheduling.metrics import RunMetrics
from seesaw.scheduling.phases import PhaseScheduler
from seesaw.scheduling.request import NewRequest, RequestState
from seesaw.scheduling.static import StaticScheduler
from seesaw.stats import EngineStats, KVUse, RequestCounts, Totals
from seesaw.step import PromptLogprobs, StepShape, TokenLogprobs, TokenUpdate, step_shape


@dataclass(frozen=True)
class ModelLimits:
    """What the scheduling cores need to know of the model and its KV."""

    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_host_blocks: int  # the node's host buffer, shared out among replicas


class StartStep(NamedTuple):
    """Send this plan's step to the replica's workers (planned in `phase`; `shape` sums its rows)."""

    replica: int
    phase: Phase
    plan: StepPlan
    shape: StepShape


class StartMove(NamedTuple):
    """Copy a request's KV between the replica's device blocks and its host slot."""

    replica: int
    move: ToHost | ToDevice


class StartReshard(NamedTuple):
    """The replica's workers re-shard into `layout`, right behind the steps already sent; the
    transition is the run's books' `index`-th."""

    replica: int
    layout: Layout
    index: int


class ReshardFinished(NamedTuple):
    """Every worker of the replica is in the new layout of transition `index`; `is_last`: no other
    re-shard of the replica is under way."""

    replica: int
    index: int
    is_last: bool


class Tokens(NamedTuple):
    """What requests gained (and which finished)."""

    updates: list[TokenUpdate]


class Refused(NamedTuple):
    """A request that cannot run: it fails with `reason` (`is_invalid`: its own size is the cause)."""

    request_id: str
    reason: str
    is_invalid: bool = False


class Stuck(NamedTuple):
    """Nothing runs, nothing moves and nothing can be scheduled on the replica: its requests were
    refused (each in a Refused effect before this one)."""

    replica: int
    reason: str


Effect = StartStep | StartMove | StartReshard | ReshardFinished | Tokens | Refused | Stuck


class _Replica:
    """A replica's core and what the engine core keeps beside it."""

    __slots__ = ("core", "pending_tokens", "reshards")

    def __init__(self, core: StaticScheduler):
        self.core = core
        self.pending_tokens = 0  # tokens still to run of the requests placed here (for placement)
        self.reshards: deque[tuple[int, set[int]]] = deque()  # (transition index, ranks yet to report)


class EngineCore:
    """The cores of every replica and the run's books; every method takes one event and returns
    the effects it leads to, in the order they must happen."""

    def __init__(self, config: SchedulerConfig, layouts: dict[Phase, Layout], limits: ModelLimits,
                 clock: Callable[[], float]):
        self.config = config
        self.layouts = layouts  # {MIXED: layout} in static mode, {PREFILL: .., DECODE: ..} in seesaw mode
        self.layout = next(iter(layouts.values()))  # replicas and world are the same in every layout
        self.limits = limits
        self.clock = clock
        self.is_seesaw = Phase.MIXED not in layouts
        self.replicas: list[_Replica] = []  # once the workers are ready
        self.metrics = RunMetrics(clock(), [self.first_phase] * self.layout.dp)
        self.failure: str | None = None
        self._early: list[NewRequest] = []  # arrived before the workers were ready (or with every replica down)
        self._held: dict[int, list[RequestState]] = {}  # a restarting replica's requests
        self._next_step_ids = [0] * self.layout.dp  # where a restarted replica's step ids go on
        self.compute_ms = 0.0  # worker time inside steps, summed over replicas
        self.totals = {"requests_added": 0, "prompt_tokens": 0, "generated_tokens": 0, "written_bytes": 0,
                       "written_s": 0.0, "read_bytes": 0, "read_s": 0.0}

    @property
    def first_phase(self) -> Phase:
        return Phase.PREFILL if self.is_seesaw else Phase.MIXED

    @property
    def cores(self) -> list[StaticScheduler]:
        return [replica.core for replica in self.replicas]

    def is_up(self, replica: int) -> bool:
        return bool(self.replicas) and replica not in self._held

    # ------------------------------------------------------------ events

    def ready(self, num_device_blocks: list[int]) -> list[Effect]:
        """The workers are loaded: each replica's device pool has this many blocks."""
        self.metrics = RunMetrics(self.clock(), [self.first_phase] * self.layout.dp)
        shares = split_host_blocks(self.limits.num_host_blocks, self.layout.dp)
        self.replicas = [_Replica(self._core(blocks, HostSlots(count, self.limits.block_size, first)))
                         for blocks, (first, count) in zip(num_device_blocks, shares)]
        return self._place_early()

    def add(self, request: NewRequest) -> list[Effect]:
        if self.failure is not None:
            return []  # the front door has answered it already
        self.totals["requests_added"] += 1
        self.totals["prompt_tokens"] += len(request.prompt_token_ids)
        return self._place(request)

    def stop(self, request_id: str) -> list[Effect]:
        replica = self.replica_of(request_id)
        if replica is None:
            self._early = [r for r in self._early if r.request_id != request_id]
            for held, states in self._held.items():
                self._held[held] = [s for s in states if s.request_id != request_id]
            return []
        self.replicas[replica].core.stop(request_id)
        return self._pump(replica)

    def step_done(self, replica: int, step_id: int, sampled: list[int], compute_ms: float = 0.0,
                  logprobs: list[TokenLogprobs | None] = (), prompt_logprobs: list[PromptLogprobs] = ()) -> list[Effect]:
        if not self.is_up(replica):
            return []  # a late answer from a replica being restarted
        self.compute_ms += compute_ms
        self.metrics.on_step_done(self.clock(), replica, step_id)
        updates = self.replicas[replica].core.complete(step_id, sampled, logprobs, prompt_logprobs)
        if not updates:
            return self._pump(replica)
        self.totals["generated_tokens"] += sum(len(update.token_ids) for update in updates)
        effects: list[Effect] = [Tokens(updates)]
        effects += self._pump(replica)
        return effects

    def kv_saved(self, request_id: str, num_bytes: int = 0, seconds: float = 0.0) -> list[Effect]:
        self.totals["written_bytes"] += num_bytes
        self.totals["written_s"] += seconds
        return self._kv_moved(request_id, lambda core: core.on_saved(request_id))

    def kv_loaded(self, request_id: str, num_bytes: int = 0, seconds: float = 0.0) -> list[Effect]:
        self.totals["read_bytes"] += num_bytes
        self.totals["read_s"] += seconds
        return self._kv_moved(request_id, lambda core: core.on_loaded(request_id))

    def resharded(self, rank: int, drain_s: float, load_s: float, num_bytes: int) -> list[Effect]:
        """A worker finished a re-shard; workers do them in order, so it is its oldest one pending."""
        replica = self.layout.coordinates(rank)[0]
        if not self.is_up(replica):
            return []
        pending = self.replicas[replica].reshards
        entry = next((entry for entry in pending if rank in entry[1]), None)
        if entry is None:
            return []
        index, ranks = entry
        ranks.discard(rank)
        self.metrics.on_resharded(index, drain_s, load_s, num_bytes)
        effects: list[Effect] = []
        while pending and not pending[0][1]:
            done, _ = pending.popleft()
            self.metrics.on_reloaded(self.clock(), done)
            effects.append(ReshardFinished(replica, done, not pending))
        return effects

    def reloaded(self, replica: int, index: int, at_s: float) -> None:
        """Every worker of the replica is in transition `index`'s layout at `at_s` (a simulator,
        which knows when a modelled reload ends, says so at once)."""
        pending = self.replicas[replica].reshards
        if pending and pending[0][0] == index:
            pending.popleft()
        self.metrics.on_reloaded(at_s, index)

    def replica_lost(self, replica: int) -> set[str]:
        """The replica's workers are being replaced: its requests (keeping the tokens they made)
        wait for its next core. Returns every request it held, finished ones with copies in flight
        among them (nothing of theirs will land)."""
        if not self.replicas or replica in self._held:
            return set()
        core = self.replicas[replica].core
        request_ids = set(core.requests)
        self._held[replica] = core.take_all()
        self._next_step_ids[replica] = core.next_step_id
        self.replicas[replica].reshards.clear()
        self.metrics.on_restart(self.clock(), replica, self.first_phase)
        return request_ids

    def hand_over(self, replica: int) -> list[Effect]:
        """A lost replica will not be restarted: the requests it held start over on the replicas
        that are up (keeping the tokens they made), each where the fewest tokens wait among those
        it fits; with none up they keep waiting for any replica to come back."""
        states = self._held.get(replica)
        up = [r for r in range(len(self.replicas)) if r not in self._held]
        if not states or not up:
            return []
        self._held[replica] = []
        effects: list[Effect] = []
        adopted: dict[int, list[RequestState]] = {}
        for state in states:
            size = (len(state.prompt_token_ids), state.max_tokens)
            index = self._choose(up, size)
            if isinstance(index, str):
                effects.append(Refused(state.request_id, f"after replica {replica} was lost, {index}"))
                continue
            self.replicas[index].pending_tokens += sum(size) - len(state.output_token_ids)
            adopted.setdefault(index, []).append(state)
        for index, taken in adopted.items():
            self.replicas[index].core.adopt(taken)
            effects += self._pump(index)
        return effects

    def num_held(self, replica: int) -> int:
        return len(self._held.get(replica, ()))

    def replica_ready(self, replica: int, num_device_blocks: int) -> list[Effect]:
        """A restarted replica is loaded again: its requests go on (the new workers may have found
        less room for KV than the old ones; a request that no longer fits fails)."""
        states = self._held.pop(replica, None)
        if states is None:
            return []
        first, count = split_host_blocks(self.limits.num_host_blocks, self.layout.dp)[replica]
        core = self._core(num_device_blocks, HostSlots(count, self.limits.block_size, first),
                          self._next_step_ids[replica])
        effects: list[Effect] = []
        fitting = []
        for state in states:
            problem = core.capacity_error(len(state.prompt_token_ids), state.max_tokens)
            if problem is None:
                fitting.append(state)
            else:
                effects.append(Refused(state.request_id, f"after replica {replica} restarted, {problem}"))
        core.adopt(fitting)
        self.replicas[replica] = _Replica(core)
        return effects + self._place_early() + self._pump(replica)

    def fail(self, reason: str) -> None:
        """The engine cannot go on: drop every request (the front door answers them)."""
        self.failure = reason
        for replica, state in enumerate(self.replicas):
            if replica not in self._held:
                state.core.fail_all()
        self._early = []
        self._held.clear()

    # ------------------------------------------------------------ queries

    def replica_of(self, request_id: str) -> int | None:
        """The replica whose core holds this request (None once it finished or before it arrived)."""
        return next((r for r, replica in enumerate(self.replicas) if request_id in replica.core.requests), None)

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting): requests with KV on a device or moving, and requests waiting to
        start, parked in the host buffer, or waiting for their replica to restart."""
        held = sum(len(states) for states in self._held.values())
        up = [r.core for index, r in enumerate(self.replicas) if index not in self._held]
        waiting = len(self._early) + held + sum(len(core.waiting) + len(core.swapped) for core in up)
        total = len(self._early) + held + sum(len(core.requests) for core in up)
        return total - waiting, waiting

    def stats(self, with_timeline: bool = False) -> EngineStats:
        """Totals, live request counts, KV pool use and the phase metrics so far."""
        running, waiting = self.num_requests()
        up = [r.core for index, r in enumerate(self.replicas) if index not in self._held]
        counters: dict[str, int] = {}
        for replica in self.replicas:
            for name, count in replica.core.counters.items():
                counters[name] = counters.get(name, 0) + count
        return EngineStats(
            run=self.metrics.summary(self.clock(), with_transitions=with_timeline),
            totals=Totals(compute_s=self.compute_ms / 1000, **self.totals, **self.metrics.decode, counters=counters),
            requests=RequestCounts(running=running, waiting=waiting),
            kv=KVUse(
                device_blocks=sum(core.pool.num_blocks for core in up),
                device_blocks_used=sum(core.pool.num_used for core in up),
                host_blocks=self.limits.num_host_blocks,
                host_blocks_used=sum(core.host.num_used for core in up),
            ),
            phases=[phase.value for phase in self.metrics.phase],
            failure=self.failure,
            timeline=self.metrics.timeline_now() if with_timeline else None,
        )

    # ------------------------------------------------------------ placing and pumping

    def _core(self, num_blocks: int, host: HostSlots, first_step_id: int = 0) -> StaticScheduler:
        limits = self.limits
        if self.is_seesaw:
            micro_batches = {phase: layout.pp for phase, layout in self.layouts.items()}
            return PhaseScheduler(self.config, num_blocks, limits.block_size, limits.max_model_len,
                                  limits.eos_token_ids, micro_batches, host, first_step_id, clock=self.clock)
        return StaticScheduler(self.config, num_blocks, limits.block_size, limits.max_model_len,
                               limits.eos_token_ids, num_micro_batches=self.layout.pp, host=host,
                               first_step_id=first_step_id)

    def _place_early(self) -> list[Effect]:
        early, self._early = self._early, []
        effects: list[Effect] = []
        for request in early:
            effects += self._place(request)
        return effects

    def _place(self, request: NewRequest) -> list[Effect]:
        """On the replica with the fewest tokens still to run, among those it fits."""
        up = [r for r in range(len(self.replicas)) if r not in self._held]
        if not up:
            self._early.append(request)
            return []
        size = (len(request.prompt_token_ids), request.sampling.max_tokens)
        index = self._choose(up, size)
        if isinstance(index, str):
            return [Refused(request.request_id, index, is_invalid=True)]
        replica = self.replicas[index]
        replica.pending_tokens += sum(size)
        replica.core.add(request)
        return self._pump(index)

    def _choose(self, up: list[int], size: tuple[int, int]) -> int | str:
        """The replica among `up` for a request of (prompt, max_tokens) `size`: the one with the
        fewest tokens still to run among those it fits; or, fitting none, why not."""
        fits = [r for r in up if self.replicas[r].core.capacity_error(*size) is None]
        if not fits:
            return min((self.replicas[r].core.capacity_error(*size) for r in up), key=len)
        return fits[0] if len(fits) == 1 else min(
            fits, key=lambda r: (self.replicas[r].pending_tokens, self.replicas[r].core.pool.num_used))

    def _kv_moved(self, request_id: str, settle: Callable[[StaticScheduler], None]) -> list[Effect]:
        """A copy landed: the core that holds the request (or, once it finished, its host slot) takes it."""
        replica = self.replica_of(request_id)
        core = self.replicas[replica].core if replica is not None else self._host_owner(request_id)
        if core is None:
            return []
        settle(core)
        self.metrics.on_host(core.host.peak_fraction)  # its fullest moment, however brief
        return self._pump(replica) if replica is not None else []

    def _host_owner(self, request_id: str) -> StaticScheduler | None:
        """The core whose host buffer share holds a finished request's slot (still to be released)."""
        return next((r.core for r in self.replicas if request_id in r.core.host), None)

    def _pump(self, index: int) -> list[Effect]:
        """Start steps while the replica has work and its pipeline has room (one step per stage,
        or two at one stage), with the KV moves and the switches they come with."""
        replica = self.replicas[index]
        core = replica.core
        effects: list[Effect] = []
        for phase, plan in core.plans():
            for move in plan.moves:
                effects.append(StartMove(index, move))
            if plan.rows:
                effects.append(self._start_step(index, phase, plan))
            elif core.is_stuck(plan):
                effects += self._stuck(index)
            if plan.switch_to is not None:
                effects += self._switch(index, phase, plan.switch_to)
        return effects

    def _start_step(self, index: int, phase: Phase, plan: StepPlan) -> StartStep:
        shape = step_shape(plan.rows)
        replica = self.replicas[index]
        replica.pending_tokens -= shape.num_tokens
        self.metrics.on_step(self.clock(), index, plan.step_id, shape.num_decode_rows, shape.context_tokens,
                             shape.num_rows, replica.core.host.used_fraction)
        return StartStep(index, phase, plan, shape)

    def _switch(self, index: int, old: Phase, new: Phase) -> list[Effect]:
        old_layout, new_layout = self.layouts[old], self.layouts[new]
        transition = self.metrics.on_switch(self.clock(), index, new, f"{old_layout}->{new_layout}",
                                            reloads=new_layout != old_layout)
        if new_layout == old_layout:
            return []  # the KV tier still moves every request; no weights change
        self.replicas[index].reshards.append((transition, set(self.layout.replica_ranks(index))))
        return [StartReshard(index, new_layout, transition)]

    def _stuck(self, index: int) -> list[Effect]:
        reason = f"replica {index} cannot schedule its requests (the device KV pool is too small for them)"
        return [*(Refused(request_id, reason) for request_id in self.replicas[index].core.fail_all()),
                Stuck(index, reason)]
