"""Scheduler actor: drives the scheduling core and keeps the workers busy.

Inbox: AddRequest, StopRequest (RequestQueue); StepDone (ShardWorker); Evicted, Restored (KVTier);
EngineReady, EngineFailed (Supervisor).
Sends: RunStep to every worker of a replica; Evict, Restore, DropHostCopy to the KVTier;
TokensGenerated and RequestFailed to the RequestQueue.

Each data-parallel replica has its own scheduling core and KV pool; a new request goes to the
least loaded replica. A replica keeps up to `pp` steps in flight, one per pipeline stage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.layout import Layout
from seesaw.messages import (
    AddRequest,
    DropHostCopy,
    EngineFailed,
    EngineReady,
    Evicted,
    RequestFailed,
    Restored,
    RunStep,
    StepDone,
    StopRequest,
    TokensGenerated,
)
from seesaw.scheduling.static import SchedulerConfig, StaticScheduler, StepPlan
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


class Scheduler(Actor):
    name = "scheduler"

    def __init__(
        self,
        inbox: Inbox,
        context: zmq.asyncio.Context,
        config: SchedulerConfig,
        layout: Layout,
        block_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        kv_tier: Outbox,
        request_queue: Outbox,
        step_timeout_s: float,
        on_stall: Callable[[str], None],
    ):
        super().__init__(inbox)
        self.context = context
        self.config = config
        self.layout = layout
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.kv_tier = kv_tier
        self.request_queue = request_queue
        self.step_timeout_s = step_timeout_s
        self.on_stall = on_stall  # called with a reason when a step outlives its timeout
        self.cores: list[StaticScheduler] = []  # one per data-parallel replica, once ready
        self.workers: list[list[Outbox]] = []  # each replica's workers
        self._early: list[AddRequest] = []  # arrived before the engine was ready
        self._timers: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self.compute_ms = 0.0  # worker time inside steps, summed over replicas

    def handle(self, message):
        match message:
            case AddRequest():
                self._on_add_request(message)
            case StopRequest():
                self._on_stop_request(message)
            case StepDone():
                self._on_step_done(message)
            case Evicted():
                self._on_evicted(message)
            case Restored():
                self._on_restored(message)
            case EngineReady():
                self._on_engine_ready(message)
            case EngineFailed():
                self._on_engine_failed(message)
            case _:
                raise ValueError(f"{self.name} cannot handle {type(message).__name__}")

    def _on_engine_ready(self, message: EngineReady) -> None:
        layout = self.layout
        self.cores = [
            StaticScheduler(self.config, blocks, self.block_size, self.max_model_len, self.eos_token_ids,
                            num_micro_batches=layout.pp, replica=replica)
            for replica, blocks in enumerate(message.num_device_blocks)
        ]
        addresses = message.worker_addresses
        self.workers = [
            [Outbox(self.context, addresses[rank]) for rank in layout.replica_ranks(replica)]
            for replica in range(layout.dp)
        ]
        early, self._early = self._early, []
        for request in early:
            self._on_add_request(request)

    def _on_add_request(self, request: AddRequest) -> None:
        if not self.cores:
            self._early.append(request)
            return
        size = (len(request.prompt_token_ids), request.max_tokens)
        fits = [r for r, core in enumerate(self.cores) if core.capacity_error(*size) is None]
        if not fits:
            problem = min((core.capacity_error(*size) for core in self.cores), key=len)
            self.request_queue.send(RequestFailed(request.request_id, problem, status_code=400))
            return
        replica = fits[0] if len(fits) == 1 else min(fits, key=lambda r: self.cores[r].load)
        self.cores[replica].add(request)
        self._pump(replica)

    def _on_stop_request(self, message: StopRequest) -> None:
        replica = self._replica_of(message.request_id)
        if replica is None:
            self._early = [r for r in self._early if r.request_id != message.request_id]
            return
        for command in self.cores[replica].stop(message.request_id):
            self.kv_tier.send(command)
        self._pump(replica)

    def _on_step_done(self, message: StepDone) -> None:
        replica = self.layout.coordinates(message.rank)[0]
        timer = self._timers.pop((replica, message.step_id), None)
        if timer is not None:
            timer.cancel()
        if not self.cores:
            return
        self.compute_ms += message.compute_ms
        updates = self.cores[replica].complete(message.step_id, message.sampled)
        if updates:
            self.request_queue.send(TokensGenerated(updates))
        self._pump(replica)

    def _on_evicted(self, message: Evicted) -> None:
        replica = self._replica_of(message.request_id)
        if replica is None:
            if message.is_stored:
                self.kv_tier.send(DropHostCopy(message.request_id))
            return
        for command in self.cores[replica].on_evicted(message.request_id, message.is_stored):
            self.kv_tier.send(command)
        self._pump(replica)

    def _on_restored(self, message: Restored) -> None:
        replica = self._replica_of(message.request_id)
        if replica is None:
            return
        self.cores[replica].on_restored(message.request_id)
        self._pump(replica)

    def _on_engine_failed(self, message: EngineFailed) -> None:
        request_ids = [r.request_id for r in self._early]
        for core in self.cores:
            request_ids += core.fail_all()
        self._early = []
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for request_id in request_ids:
            self.request_queue.send(RequestFailed(request_id, message.reason, status_code=500))

    def _replica_of(self, request_id: str) -> int | None:
        """The replica whose core holds this request (None once it finished or before it arrived)."""
        return next((r for r, core in enumerate(self.cores) if request_id in core.requests), None)

    def _pump(self, replica: int) -> None:
        """Start steps while the replica has work and its pipeline has room (one step per stage)."""
        core = self.cores[replica]
        while core.has_unfinished and core.num_in_flight_steps < self.layout.pp:
            plan = core.schedule()
            for command in (*plan.evictions, *plan.restores):
                self.kv_tier.send(command)
            if not plan.rows:
                if plan.is_empty and not core.num_in_flight_steps and not core.has_kv_moves:
                    self._fail_stuck(replica)
                return
            self._run(replica, plan)

    def _fail_stuck(self, replica: int) -> None:
        """Nothing runs, nothing moves, and nothing can be scheduled: fail rather than wait forever."""
        reason = f"replica {replica} cannot schedule its requests (the device KV pool is too small for them)"
        log.error("%s", reason)
        for request_id in self.cores[replica].fail_all():
            self.request_queue.send(RequestFailed(request_id, reason, status_code=500))

    def _run(self, replica: int, plan: StepPlan) -> None:
        step = RunStep(plan.step_id, plan.rows)
        for worker in self.workers[replica]:
            worker.send(step)
        reason = (f"step {plan.step_id} of replica {replica} ({len(plan.rows)} requests) did not finish "
                  f"within {self.step_timeout_s:.0f} s")
        self._timers[(replica, plan.step_id)] = asyncio.get_running_loop().call_later(
            self.step_timeout_s, self._on_stalled, reason
        )

    def _on_stalled(self, reason: str) -> None:
        log.error("%s", reason)
        self._on_engine_failed(EngineFailed(reason))
        self.on_stall(reason)

    async def stop(self) -> None:
        await super().stop()
        for outboxes in self.workers:
            for outbox in outboxes:
                outbox.close(linger_s=0)
