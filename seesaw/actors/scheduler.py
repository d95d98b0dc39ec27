"""Scheduler actor: drives the scheduling core and keeps the workers busy.

Inbox: AddRequest, StopRequest (RequestQueue); StepDone (ShardWorker); Evicted, Restored (KVTier);
EngineReady, EngineFailed (Supervisor).
Sends: RunStep to every worker; Evict, Restore, DropHostCopy to the KVTier; TokensGenerated and
RequestFailed to the RequestQueue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from seesaw.actors.base import Actor
from seesaw.messages import (
    AddRequest,
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
        config: SchedulerConfig,
        block_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        workers: list[Outbox],
        kv_tier: Outbox,
        request_queue: Outbox,
        step_timeout_s: float,
        on_stall: Callable[[str], None],
    ):
        super().__init__(inbox)
        self.config = config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.workers = workers
        self.kv_tier = kv_tier
        self.request_queue = request_queue
        self.step_timeout_s = step_timeout_s
        self.on_stall = on_stall  # called with a reason when a step outlives its timeout
        self.core: StaticScheduler | None = None
        self._early: list[AddRequest] = []  # arrived before the engine was ready
        self._timers: dict[int, asyncio.TimerHandle] = {}

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
        self.core = StaticScheduler(
            self.config, message.num_device_blocks, self.block_size, self.max_model_len, self.eos_token_ids
        )
        early, self._early = self._early, []
        for request in early:
            self._on_add_request(request)

    def _on_add_request(self, request: AddRequest) -> None:
        if self.core is None:
            self._early.append(request)
            return
        problem = self.core.capacity_error(len(request.prompt_token_ids), request.max_tokens)
        if problem is not None:
            self.request_queue.send(RequestFailed(request.request_id, problem, status_code=400))
            return
        self.core.add(request)
        self._pump()

    def _on_stop_request(self, message: StopRequest) -> None:
        if self.core is None:
            self._early = [r for r in self._early if r.request_id != message.request_id]
            return
        for command in self.core.stop(message.request_id):
            self.kv_tier.send(command)
        self._pump()

    def _on_step_done(self, message: StepDone) -> None:
        timer = self._timers.pop(message.step_id, None)
        if timer is not None:
            timer.cancel()
        updates = self.core.complete(message.step_id, message.sampled)
        if updates:
            self.request_queue.send(TokensGenerated(updates))
        self._pump()

    def _on_evicted(self, message: Evicted) -> None:
        for command in self.core.on_evicted(message.request_id, message.is_stored):
            self.kv_tier.send(command)
        self._pump()

    def _on_restored(self, message: Restored) -> None:
        self.core.on_restored(message.request_id)
        self._pump()

    def _on_engine_failed(self, message: EngineFailed) -> None:
        request_ids = self.core.fail_all() if self.core is not None else []
        request_ids += [r.request_id for r in self._early]
        self._early = []
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for request_id in request_ids:
            self.request_queue.send(RequestFailed(request_id, message.reason, status_code=500))

    def _pump(self) -> None:
        """Start steps while the core has work and the pipeline has room."""
        while self.core is not None and self.core.has_unfinished and self.core.num_in_flight_steps < 1:
            plan = self.core.schedule()
            self._send_kv_moves(plan)
            if not plan.rows:
                return
            self._run(plan)

    def _send_kv_moves(self, plan: StepPlan) -> None:
        for command in (*plan.evictions, *plan.restores):
            self.kv_tier.send(command)

    def _run(self, plan: StepPlan) -> None:
        step = RunStep(plan.step_id, plan.rows)
        for worker in self.workers:
            worker.send(step)
        reason = f"step {plan.step_id} ({len(plan.rows)} requests) did not finish within {self.step_timeout_s:.0f} s"
        self._timers[plan.step_id] = asyncio.get_running_loop().call_later(self.step_timeout_s, self._on_stalled, reason)

    def _on_stalled(self, reason: str) -> None:
        log.error("%s", reason)
        self._on_engine_failed(EngineFailed(reason))
        self.on_stall(reason)
