"""Scheduler actor: turns messages into the engine core's events and its effects into messages.

Inbox: AddRequest, StopRequest (RequestQueue); QueryStats (front doors, Engine); StepDone, Resharded
(ShardWorker); KVSaved, KVLoaded (KVTier); EngineReady, ReplicaLost, ReplicaReady (Supervisor);
EngineFailed (Engine).
Sends: RunStep and Reshard to every worker of a replica; SaveKV and LoadKV to the KVTier;
TokensGenerated and RequestFailed to the RequestQueue; WorkersBusy to the Supervisor; EngineFailed
to the Engine when a step, a copy or a re-shard outlives its timeout; StatsReport to whoever asked.

The decisions (which replica, what runs next, when to switch phases) and the run's books are the
pure `EngineCore`'s, which the simulator drives too; this actor keeps the connections to the
workers and a timer on everything it starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.actors.replica_workers import ReplicaWorkers
from seesaw.scheduling.grammars import GrammarError, Grammars
from seesaw.config import SchedulerConfig
from seesaw.layout import Layout
from seesaw.messages import (
    AddRequest,
    EngineFailed,
    EngineReady,
    ErrorCode,
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
from seesaw.scheduling.decisions import Phase, ToHost
from seesaw.scheduling.engine_core import (
    Effect,
    EngineCore,
    ModelLimits,
    Refused,
    ReshardFinished,
    StartMove,
    StartReshard,
    StartStep,
    Stuck,
    Tokens,
)
from seesaw.scheduling.request import NewRequest
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


class StepTimer(NamedTuple):
    replica: int
    step_id: int


class MoveTimer(NamedTuple):
    request_id: str


class ReshardTimer(NamedTuple):
    replica: int
    transition: int


Timer = StepTimer | MoveTimer | ReshardTimer  # what the Scheduler waits on, each with a deadline


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
        grammars: Grammars | None = None,  # None: constrained requests are refused
    ):
        super().__init__(inbox)
        self.context = context
        self.core = EngineCore(config, layouts, limits, clock=time.monotonic)
        self._gone: set[int] = set()  # replicas lost for good, unless their workers join again
        self.layout = self.core.layout
        self.kv_tier = kv_tier
        self.request_queue = request_queue
        self.supervisor = supervisor
        self.engine = engine
        self.step_timeout_s = step_timeout_s
        self.workers = ReplicaWorkers(self, context, self.layout)
        self._timers: dict[Timer, asyncio.TimerHandle] = {}  # steps, re-shards and KV moves in flight
        self._replies: dict[str, Outbox] = {}  # where stats go, by address
        self.grammars = grammars
        self._compiling: dict[str, asyncio.Task] = {}  # constrained requests whose grammar compiles, by id

    def handle(self, message):
        match message:
            case AddRequest():
                if message.sampling.is_constrained:
                    self._compile(message)
                else:
                    self._add(message)
            case StopRequest():
                task = self._compiling.pop(message.request_id, None)
                if task is not None:
                    task.cancel()
                if self.grammars is not None:
                    self.grammars.forget(message.request_id)
                self._apply(self.core.stop(message.request_id))
            case StepDone():
                replica = self.layout.coordinates(message.rank)[0]
                self._disarm(StepTimer(replica, message.step_id))
                self._apply(self.core.step_done(replica, message.step_id, message.sampled, message.compute_ms,
                                                message.logprobs, message.prompt_logprobs))
            case Resharded():
                log.info("rank %d is in %s: waited %.3f s for its last steps, loaded %.1f MB in %.3f s",
                         message.rank, message.layout, message.drain_s, message.num_bytes / 1e6, message.load_s)
                self._apply(self.core.resharded(message.rank, message.drain_s, message.load_s, message.num_bytes))
            case KVSaved():
                self._disarm(MoveTimer(message.request_id))
                self._apply(self.core.kv_saved(message.request_id, message.num_bytes, message.seconds))
            case KVLoaded():
                self._disarm(MoveTimer(message.request_id))
                self._apply(self.core.kv_loaded(message.request_id, message.num_bytes, message.seconds))
            case QueryStats():
                self._on_query_stats(message)
            case EngineReady():
                self.workers.connect_all(message.worker_addresses)
                self._apply(self.core.ready(message.num_device_blocks))
            case ReplicaLost():
                self._on_replica_lost(message)
            case ReplicaReady():
                self.workers.connect(message.replica, message.worker_addresses)
                self._gone.discard(message.replica)
                self._apply(self.core.replica_ready(message.replica, message.num_device_blocks))
                for replica in sorted(self._gone):  # requests a gone replica left while none was up
                    self._apply(self.core.hand_over(replica))
            case EngineFailed():
                self._on_engine_failed(message)

    def _add(self, message: AddRequest) -> None:
        self._apply(self.core.add(NewRequest(message.request_id, message.prompt_token_ids, message.sampling)))

    def _compile(self, message: AddRequest) -> None:
        """A constrained request joins the core once its grammar is compiled (on a thread, within
        the step timeout), or is refused with what is wrong with it."""
        request_id = message.request_id
        if self.grammars is None:
            self.request_queue.send(RequestFailed(request_id, "this engine has no grammar engine for constrained "
                                                              "outputs (it needs the model's tokenizer)",
                                                  ErrorCode.INVALID_REQUEST))
            return

        async def compile_then_add() -> None:
            try:
                compiled = await asyncio.wait_for(asyncio.to_thread(self.grammars.compile, message.sampling.constraint),
                                                  self.step_timeout_s)
            except GrammarError as error:
                self.request_queue.send(RequestFailed(request_id, str(error), ErrorCode.INVALID_REQUEST))
                return
            except TimeoutError:
                self.request_queue.send(RequestFailed(request_id, f"its grammar did not compile within "
                                                                  f"{self.step_timeout_s:.0f} s", ErrorCode.INVALID_REQUEST))
                return
            finally:
                self._compiling.pop(request_id, None)
            if self.core.failure is None:
                self.grammars.start(request_id, compiled)
                self._add(message)

        self._compiling[request_id] = asyncio.get_running_loop().create_task(compile_then_add())

    def _on_replica_lost(self, message: ReplicaLost) -> None:
        """The replica's workers are being replaced: its requests wait in the core for its next workers."""
        replica = message.replica
        if not self.core.is_up(replica):
            return
        request_ids = self.core.replica_lost(replica)
        for key in [key for key in self._timers if (key.request_id in request_ids if isinstance(key, MoveTimer)
                                                    else key.replica == replica)]:
            self._timers.pop(key).cancel()
        self.workers.drop(replica)
        if message.is_gone:
            self._gone.add(replica)
            num_held = self.core.num_held(replica)
            self._apply(self.core.hand_over(replica))
            log.warning("replica %d lost (%s); its %d requests go on on the other replicas", replica,
                        message.reason, num_held)
            return
        log.warning("replica %d lost (%s); %d requests wait for it to restart", replica, message.reason,
                    self.core.num_held(replica))

    def _on_engine_failed(self, message: EngineFailed) -> None:
        """Drop every request and timer; the RequestQueue answers the requests (the Engine told it too)."""
        self.core.fail(message.reason)
        for task in self._compiling.values():
            task.cancel()
        self._compiling.clear()
        if self.grammars is not None:
            self.grammars.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # ------------------------------------------------------------ effects into messages

    def _apply(self, effects: list[Effect]) -> None:
        if self.grammars is not None:
            self._advance_grammars(effects)
        for effect in effects:
            match effect:
                case StartStep(replica, _, plan):
                    if self.grammars is not None:
                        self._mask(plan.rows)
                    self.workers.send(replica, RunStep(plan.step_id, plan.rows, plan.released))
                    self._arm(StepTimer(replica, plan.step_id), f"step {plan.step_id} of replica {replica} "
                              f"({len(plan.rows)} requests) did not finish within {self.step_timeout_s:.0f} s")
                case StartMove(replica, move):
                    self._send_move(replica, move)
                case StartReshard(replica, layout, index):
                    self._start_reshard(replica, layout, index)
                case ReshardFinished(replica, index, is_last):
                    self._disarm(ReshardTimer(replica, index))
                    if is_last:
                        self.supervisor.send(WorkersBusy(list(self.layout.replica_ranks(replica)), "running steps"))
                case Tokens(updates):
                    self.request_queue.send(TokensGenerated(updates))
                case Refused(request_id, reason, is_invalid):
                    code = ErrorCode.INVALID_REQUEST if is_invalid else ErrorCode.SERVER_ERROR
                    self.request_queue.send(RequestFailed(request_id, reason, code))
                case Stuck(_, reason):
                    log.error("%s", reason)

    def _advance_grammars(self, effects: list[Effect]) -> None:
        """Every constrained request's matcher takes its new tokens before any row is masked; a
        token its grammar refuses (which the mask rules out) stops the request with that error."""
        for effect in effects:
            if isinstance(effect, Refused):
                self.grammars.forget(effect.request_id)
            if not isinstance(effect, Tokens):
                continue
            for update in effect.updates:
                if update.request_id not in self.grammars:
                    continue
                if not self.grammars.accept(update.request_id, update.token_ids):
                    log.error("request %s sampled a token its grammar refuses", update.request_id)
                    self.request_queue.send(RequestFailed(update.request_id, "a sampled token broke the output's "
                                                                             "grammar", ErrorCode.SERVER_ERROR))
                    self.grammars.forget(update.request_id)
                    effects.extend(self.core.stop(update.request_id))
                elif update.finish_reason is not None:
                    self.grammars.forget(update.request_id)

    def _mask(self, rows) -> None:
        """Each sampling row of a constrained request carries the tokens its grammar allows next."""
        constrained = [row for row in rows if row.sampling is not None and row.request_id in self.grammars]
        if constrained:
            for row, mask in zip(constrained, self.grammars.masks([row.request_id for row in constrained])):
                row.sampling.allowed = mask

    def _start_reshard(self, replica: int, layout: Layout, index: int) -> None:
        log.info("replica %d: re-sharding to %s (transition %d)", replica, layout, index)
        self.workers.send(replica, Reshard(layout))
        self.supervisor.send(WorkersBusy(list(self.layout.replica_ranks(replica)), f"re-sharding to {layout}"))
        self._arm(ReshardTimer(replica, index), f"replica {replica} did not finish re-sharding to {layout} "
                                                f"within {self.step_timeout_s:.0f} s")

    def _send_move(self, replica: int, move) -> None:
        layout = self.core.layouts[move.phase]
        if isinstance(move, ToHost):
            self.kv_tier.send(SaveKV(move.request_id, replica, layout, move.block_ids, move.host_block_ids))
            what = "to the host buffer"
        else:
            self.kv_tier.send(LoadKV(move.request_id, replica, layout, move.host_block_ids, move.block_ids,
                                     list(move.shared_holders)))
            what = "from the host buffer"
        self._arm(MoveTimer(move.request_id), f"copying request {move.request_id}'s KV {what} (replica {replica}) "
                                              f"did not finish within {self.step_timeout_s:.0f} s")

    def _arm(self, key: Timer, reason: str) -> None:
        """Fail the engine unless what `key` names is done within the step timeout."""
        self._timers[key] = asyncio.get_running_loop().call_later(self.step_timeout_s, self._on_stalled, reason)

    def _disarm(self, key: Timer) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _on_stalled(self, reason: str) -> None:
        log.error("%s", reason)
        self._on_engine_failed(EngineFailed(reason))
        self.engine.send(EngineFailed(reason))

    # ------------------------------------------------------------ stats

    def _on_query_stats(self, message: QueryStats) -> None:
        if message.reply_to not in self._replies:
            if len(self._replies) >= 64:  # askers come and go; keep a few outboxes, not one per asker ever
                self.disconnect(self._replies.pop(next(iter(self._replies))))
            self._replies[message.reply_to] = self.connect(self.context, message.reply_to)
        self._replies[message.reply_to].send(StatsReport(message.query_id, self.core.stats(message.with_timeline)))
