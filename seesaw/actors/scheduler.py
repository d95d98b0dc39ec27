"""Scheduler actor: drives one scheduling core per replica and turns its decisions into messages.

Inbox: AddRequest, StopRequest (RequestQueue); QueryStats (front doors, Engine); StepDone, Resharded
(ShardWorker); KVSaved, KVLoaded (KVTier); EngineReady, ReplicaLost, ReplicaReady (Supervisor);
EngineFailed (Engine).
Sends: RunStep and Reshard to every worker of a replica; SaveKV and LoadKV to the KVTier;
TokensGenerated and RequestFailed to the RequestQueue; WorkersBusy to the Supervisor; EngineFailed
to the Engine when a step, a copy or a re-shard outlives its timeout; StatsReport to whoever asked.

Each data-parallel replica has its own core, KV pool and share of the host buffer; a new request
goes to the least loaded replica. A replica keeps up to `pp` steps in flight, one per pipeline
stage of its current layout (two at one stage: the next is planned while one runs, its rows
awaiting the tokens that one samples). In seesaw mode the core is the phase machine and a phase
switch sends Reshard to the replica's workers right behind the old phase's last steps. While a
lost replica restarts, its requests wait (keeping what they generated) for its new core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.config import SchedulerConfig
from seesaw.kv.host_slots import HostSlots, split_host_blocks
from seesaw.layout import Layout
from seesaw.messages import (
    AddRequest,
    ErrorCode,
    EngineFailed,
    EngineReady,
    KVLoaded,
    KVSaved,
    LoadKV,
    QueryStats,
    ReplicaLost,
    ReplicaReady,
    RequestFailed,
    Reshard,
    Resharded,
    RunStep,
    SaveKV,
    StatsReport,
    StepDone,
    StopRequest,
    ToScheduler,
    TokensGenerated,
    WorkersBusy,
)
from seesaw.scheduling.decisions import Phase, StepPlan, ToDevice, ToHost
from seesaw.scheduling.metrics import RunMetrics
from seesaw.scheduling.phases import PhaseScheduler
from seesaw.scheduling.request import RequestState
from seesaw.scheduling.static import StaticScheduler
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLimits:
    """What the scheduler needs to know of the model and its KV."""

    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_host_blocks: int  # the node's host buffer, shared out among replicas


class Scheduler(Actor):
    name = "scheduler"
    accepts = ToScheduler

    def __init__(
        self,
        inbox: Inbox,
        context: zmq.asyncio.Context,
        config: SchedulerConfig,
        layouts: dict[Phase, Layout],  # {MIXED: layout} in static mode, {PREFILL: .., DECODE: ..} in seesaw mode
        limits: ModelLimits,
        kv_tier: Outbox,
        request_queue: Outbox,
        supervisor: Outbox,
        engine: Outbox,
        step_timeout_s: float,
    ):
        super().__init__(inbox)
        self.context = context
        self.config = config
        self.layouts = layouts
        self.layout = next(iter(layouts.values()))  # replicas and world are the same in every layout
        self.limits = limits
        self.kv_tier = kv_tier
        self.request_queue = request_queue
        self.supervisor = supervisor
        self.engine = engine
        self.step_timeout_s = step_timeout_s
        self.is_seesaw = Phase.MIXED not in layouts
        self.cores: list[StaticScheduler] = []  # one per data-parallel replica, once ready
        self.workers: list[list[Outbox]] = []  # each replica's workers
        self.metrics = RunMetrics(time.monotonic(), [self._first_phase()] * self.layout.dp)
        self._early: list[AddRequest] = []  # arrived before the engine was ready (or with every replica down)
        self._held: dict[int, list[RequestState]] = {}  # a restarting replica's requests
        self._timers: dict[tuple, asyncio.TimerHandle] = {}  # steps, re-shards and KV moves in flight
        # Each replica's re-shards in progress, oldest first: (metrics index, ranks yet to report).
        self._reshards: list[deque[tuple[int, set[int]]]] = [deque() for _ in range(self.layout.dp)]
        self._next_step_ids = [0] * self.layout.dp  # where a restarted replica's step ids go on
        self.compute_ms = 0.0  # worker time inside steps, summed over replicas
        self.failure: str | None = None
        # Requests and tokens so far, and KV bytes moved and copy seconds (summed over workers).
        self.totals = {"requests_added": 0, "prompt_tokens": 0, "generated_tokens": 0, "written_bytes": 0,
                       "written_s": 0.0, "read_bytes": 0, "read_s": 0.0}
        self._replies: dict[str, Outbox] = {}  # where stats go, by address

    def _first_phase(self) -> Phase:
        return Phase.PREFILL if self.is_seesaw else Phase.MIXED

    def handle(self, message):
        match message:
            case AddRequest():
                self._on_add_request(message)
            case StopRequest():
                self._on_stop_request(message)
            case StepDone():
                self._on_step_done(message)
            case Resharded():
                self._on_resharded(message)
            case KVSaved():
                self._count_kv("written", message.num_bytes, message.seconds)
                self._on_kv_moved(message.request_id, StaticScheduler.on_saved)
            case KVLoaded():
                self._count_kv("read", message.num_bytes, message.seconds)
                self._on_kv_moved(message.request_id, StaticScheduler.on_loaded)
            case QueryStats():
                self._on_query_stats(message)
            case EngineReady():
                self._on_engine_ready(message)
            case ReplicaLost():
                self._on_replica_lost(message)
            case ReplicaReady():
                self._on_replica_ready(message)
            case EngineFailed():
                self._on_engine_failed(message)

    def _on_engine_ready(self, message: EngineReady) -> None:
        limits, layout = self.limits, self.layout
        self.metrics = RunMetrics(time.monotonic(), [self._first_phase()] * layout.dp)
        self.cores = [
            self._core(blocks, HostSlots(count, limits.block_size, first))
            for blocks, (first, count) in zip(message.num_device_blocks,
                                               split_host_blocks(limits.num_host_blocks, layout.dp))
        ]
        addresses = message.worker_addresses
        self.workers = [
            [self.connect(self.context, addresses[rank]) for rank in layout.replica_ranks(replica)]
            for replica in range(layout.dp)
        ]
        early, self._early = self._early, []
        for request in early:
            self._place(request)

    def _core(self, num_blocks: int, host: HostSlots, first_step_id: int = 0) -> StaticScheduler:
        limits = self.limits
        if self.is_seesaw:
            micro_batches = {phase: layout.pp for phase, layout in self.layouts.items()}
            return PhaseScheduler(self.config, num_blocks, limits.block_size, limits.max_model_len,
                                  limits.eos_token_ids, micro_batches, host, first_step_id, clock=time.monotonic)
        return StaticScheduler(self.config, num_blocks, limits.block_size, limits.max_model_len,
                               limits.eos_token_ids, num_micro_batches=self.layout.pp, host=host,
                               first_step_id=first_step_id)

    def _on_replica_lost(self, message: ReplicaLost) -> None:
        """The replica's workers are being replaced: keep its requests for its next core."""
        replica = message.replica
        if not self.cores or replica in self._held:
            return
        core = self.cores[replica]
        request_ids = set(core.requests)  # stopped ones too: their copies will not land either
        states = core.take_all()
        self._held[replica] = states
        self._next_step_ids[replica] = core.next_step_id
        for key in [key for key in self._timers if key[0] == replica or key[1] in request_ids]:
            self._timers.pop(key).cancel()
        self._reshards[replica].clear()
        for outbox in self.workers[replica]:
            self.disconnect(outbox)
        self.workers[replica] = []
        self.metrics.on_restart(time.monotonic(), replica, self._first_phase())
        log.warning("replica %d lost (%s); %d requests wait for it to restart", replica, message.reason, len(states))

    def _on_replica_ready(self, message: ReplicaReady) -> None:
        replica = message.replica
        states = self._held.pop(replica, None)
        if states is None:
            return
        first, count = split_host_blocks(self.limits.num_host_blocks, self.layout.dp)[replica]
        core = self._core(message.num_device_blocks, HostSlots(count, self.limits.block_size, first),
                          self._next_step_ids[replica])
        fitting = []
        for state in states:  # the new workers may have found less room for KV than the old ones
            problem = core.capacity_error(len(state.prompt_token_ids), state.max_tokens)
            if problem is None:
                fitting.append(state)
            else:
                self.request_queue.send(RequestFailed(state.request_id, f"after replica {replica} restarted, "
                                                                        f"{problem}"))
        core.adopt(fitting)
        self.cores[replica] = core
        self.workers[replica] = [self.connect(self.context, address) for address in message.worker_addresses]
        early, self._early = self._early, []
        for request in early:
            self._place(request)
        self._pump(replica)

    def _on_add_request(self, request: AddRequest) -> None:
        if self.failure is not None:
            return  # the RequestQueue has answered it already
        self.totals["requests_added"] += 1
        self.totals["prompt_tokens"] += len(request.prompt_token_ids)
        self._place(request)

    def _place(self, request: AddRequest) -> None:
        up = [r for r in range(len(self.cores)) if r not in self._held]
        if not up:
            self._early.append(request)
            return
        size = (len(request.prompt_token_ids), request.max_tokens)
        fits = [r for r in up if self.cores[r].capacity_error(*size) is None]
        if not fits:
            problem = min((self.cores[r].capacity_error(*size) for r in up), key=len)
            self.request_queue.send(RequestFailed(request.request_id, problem, ErrorCode.INVALID_REQUEST))
            return
        replica = fits[0] if len(fits) == 1 else min(fits, key=lambda r: self.cores[r].load)
        self.cores[replica].add(request)
        self._pump(replica)

    def _on_stop_request(self, message: StopRequest) -> None:
        replica = self._replica_of(message.request_id)
        if replica is None:
            self._early = [r for r in self._early if r.request_id != message.request_id]
            for replica, states in self._held.items():
                self._held[replica] = [s for s in states if s.request_id != message.request_id]
            return
        self.cores[replica].stop(message.request_id)
        self._pump(replica)

    def _on_step_done(self, message: StepDone) -> None:
        replica = self.layout.coordinates(message.rank)[0]
        timer = self._timers.pop((replica, message.step_id), None)
        if timer is not None:
            timer.cancel()
        if not self.cores or replica in self._held:
            return  # a late answer from a replica being restarted
        self.compute_ms += message.compute_ms
        self.metrics.on_step_done(time.monotonic(), replica, message.step_id)
        updates = self.cores[replica].complete(message.step_id, message.sampled)
        self.totals["generated_tokens"] += sum(len(update.token_ids) for update in updates)
        if updates:
            self.request_queue.send(TokensGenerated(updates))
        self._pump(replica)

    def _on_kv_moved(self, request_id: str, settle: Callable[[StaticScheduler, str], None]) -> None:
        timer = self._timers.pop(("kv", request_id), None)
        if timer is not None:
            timer.cancel()
        replica = self._replica_of(request_id)
        core = self.cores[replica] if replica is not None else self._host_owner(request_id)
        if core is None:
            return
        settle(core, request_id)
        self.metrics.on_host(core.host.peak_fraction)  # its fullest moment, however brief
        if replica is not None:
            self._pump(replica)

    def _host_owner(self, request_id: str) -> StaticScheduler | None:
        """The core whose host buffer share holds a finished request's slot (still to be released)."""
        return next((core for core in self.cores if request_id in core.host), None)

    def _on_resharded(self, message: Resharded) -> None:
        """A worker finished a re-shard; workers do them in order, so it is its oldest one pending."""
        replica = self.layout.coordinates(message.rank)[0]
        pending = self._reshards[replica]
        entry = next((entry for entry in pending if message.rank in entry[1]), None)
        if entry is None:
            return
        index, ranks = entry
        ranks.discard(message.rank)
        self.metrics.on_resharded(index, message.drain_s, message.load_s, message.num_bytes)
        log.info("rank %d is in %s: waited %.3f s for its last steps, loaded %.1f MB in %.3f s",
                 message.rank, message.layout, message.drain_s, message.num_bytes / 1e6, message.load_s)
        while pending and not pending[0][1]:
            done, _ = pending.popleft()
            self.metrics.on_reloaded(time.monotonic(), done)
            timer = self._timers.pop((replica, f"reshard {done}"), None)
            if timer is not None:
                timer.cancel()
        if not pending:
            self.supervisor.send(WorkersBusy(list(self.layout.replica_ranks(replica)), "running steps"))

    def _on_engine_failed(self, message: EngineFailed) -> None:
        """Drop every request and timer; the RequestQueue answers the requests (the Engine told it too)."""
        self.failure = message.reason
        for replica, core in enumerate(self.cores):
            if replica not in self._held:
                core.fail_all()
        self._early = []
        self._held.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _replica_of(self, request_id: str) -> int | None:
        """The replica whose core holds this request (None once it finished or before it arrived)."""
        return next((r for r, core in enumerate(self.cores) if request_id in core.requests), None)

    # ------------------------------------------------------------ decisions into messages

    def _pump(self, replica: int) -> None:
        """Start steps while the replica has work and its pipeline has room (one step per stage)."""
        core = self.cores[replica]
        for phase_before, plan in core.plans():
            for move in plan.moves:
                self._send_move(replica, move)
            if plan.rows:
                self._run(replica, plan)
            if plan.switch_to is not None:
                self._switch(replica, phase_before, plan.switch_to)
            if core.is_stuck(plan):
                self._fail_stuck(replica)

    def _send_move(self, replica: int, move: ToHost | ToDevice) -> None:
        layout = str(self.layouts[move.phase])
        match move:
            case ToHost():
                self.kv_tier.send(SaveKV(move.request_id, replica, layout, move.block_ids, move.host_block_ids))
                what = "to the host buffer"
            case ToDevice():
                self.kv_tier.send(LoadKV(move.request_id, replica, layout, move.host_block_ids, move.block_ids))
                what = "from the host buffer"
        self._arm(("kv", move.request_id), f"copying request {move.request_id}'s KV {what} (replica {replica}) "
                                           f"did not finish within {self.step_timeout_s:.0f} s")

    def _switch(self, replica: int, old: Phase, new: Phase) -> None:
        old_layout, new_layout = self.layouts[old], self.layouts[new]
        direction = f"{old_layout}->{new_layout}"
        index = self.metrics.on_switch(time.monotonic(), replica, new, direction, reloads=new_layout != old_layout)
        log.info("replica %d: %s phase in %s (transition %d)", replica, new.value, new_layout, index)
        if new_layout == old_layout:
            return  # the KV tier still moves every request; no weights change
        ranks = self.layout.replica_ranks(replica)
        self._reshards[replica].append((index, set(ranks)))
        for worker in self.workers[replica]:
            worker.send(Reshard(str(new_layout)))
        self.supervisor.send(WorkersBusy(list(ranks), f"re-sharding to {new_layout}"))
        self._arm((replica, f"reshard {index}"), f"replica {replica} did not finish re-sharding to {new_layout} "
                                                 f"within {self.step_timeout_s:.0f} s")

    def _fail_stuck(self, replica: int) -> None:
        """Nothing runs, nothing moves, and nothing can be scheduled: fail rather than wait forever."""
        reason = f"replica {replica} cannot schedule its requests (the device KV pool is too small for them)"
        log.error("%s", reason)
        for request_id in self.cores[replica].fail_all():
            self.request_queue.send(RequestFailed(request_id, reason))

    def _run(self, replica: int, plan: StepPlan) -> None:
        step = RunStep(plan.step_id, plan.rows, plan.released)
        for worker in self.workers[replica]:
            worker.send(step)
        num_decode_rows = sum(1 for row in plan.rows if row.num_new_tokens == 1 and row.start > 0)
        context_tokens = sum(row.start + 1 for row in plan.rows)
        self.metrics.on_step(time.monotonic(), replica, plan.step_id, num_decode_rows, context_tokens, len(plan.rows),
                             self.cores[replica].host.used_fraction)
        self._arm((replica, plan.step_id), f"step {plan.step_id} of replica {replica} ({len(plan.rows)} "
                                           f"requests) did not finish within {self.step_timeout_s:.0f} s")

    def _arm(self, key: tuple, reason: str) -> None:
        """Fail the engine unless what `key` names is done within the step timeout."""
        self._timers[key] = asyncio.get_running_loop().call_later(self.step_timeout_s, self._on_stalled, reason)

    def _on_stalled(self, reason: str) -> None:
        log.error("%s", reason)
        self._on_engine_failed(EngineFailed(reason))
        self.engine.send(EngineFailed(reason))

    # ------------------------------------------------------------ stats

    def _count_kv(self, direction: str, num_bytes: int, seconds: float) -> None:
        self.totals[f"{direction}_bytes"] += num_bytes
        self.totals[f"{direction}_s"] += seconds

    def _on_query_stats(self, message: QueryStats) -> None:
        if message.reply_to not in self._replies:
            if len(self._replies) >= 64:  # askers come and go; keep a few outboxes, not one per asker ever
                self.disconnect(self._replies.pop(next(iter(self._replies))))
            self._replies[message.reply_to] = self.connect(self.context, message.reply_to)
        self._replies[message.reply_to].send(StatsReport(message.query_id, self.stats(message.with_timeline)))

    def stats(self, with_timeline: bool = False) -> dict:
        """Counters, live request counts, KV pool use and the phase metrics so far."""
        running, waiting = self.num_requests()
        up = [core for replica, core in enumerate(self.cores) if replica not in self._held]
        counters: dict[str, float] = {"compute_s": self.compute_ms / 1000, **self.totals, **self.metrics.decode}
        for core in self.cores:
            for name, count in core.counters.items():
                counters[name] = counters.get(name, 0) + count
        stats = {
            **self.metrics.summary(time.monotonic(), with_transitions=with_timeline),
            "totals": counters,
            "requests": {"running": running, "waiting": waiting},
            "kv": {
                "device_blocks": sum(core.pool.num_blocks for core in up),
                "device_blocks_used": sum(core.pool.num_used for core in up),
                "host_blocks": self.limits.num_host_blocks,
                "host_blocks_used": sum(core.host.num_used for core in up),
            },
            "phases": [phase.value for phase in self.metrics.phase],
            "failure": self.failure,
        }
        if with_timeline:
            stats["timeline"] = self.metrics.timeline_dict()
        return stats

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting): requests with KV on a device or moving, and requests waiting to
        start, parked in the host buffer, or waiting for their replica to restart."""
        held = sum(len(states) for states in self._held.values())
        up = [core for replica, core in enumerate(self.cores) if replica not in self._held]
        waiting = len(self._early) + held + sum(len(core.waiting) + len(core.swapped) for core in up)
        total = len(self._early) + held + sum(len(core.requests) for core in up)
        return total - waiting, waiting
