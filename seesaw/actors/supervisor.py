"""Supervisor actor: gathers the world of workers, has them load their shards, watches them, and
fails the engine loudly when one is lost.

Inbox: WorkerHello, GroupsPrepared, WorkerReady, WorkerFailed, Heartbeat (ShardWorker, or the
engine's process watch); WorkersBusy (Scheduler).
Sends: RankAssigned, PrepareGroups, LoadShard, HeadAlive and Shutdown to workers; EngineReady to the
Scheduler and the KVTier; EngineFailed to the Scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.layout import Layout, groups_of
from seesaw.messages import (
    CollectiveSpec,
    EngineFailed,
    EngineReady,
    GroupSpec,
    GroupsPrepared,
    HeadAlive,
    Heartbeat,
    LoadShard,
    PrepareGroups,
    RankAssigned,
    Shutdown,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
    WorkersBusy,
)
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)

LoadCommand = Callable[[int, CollectiveSpec | None], LoadShard]


class Supervisor(Actor):
    name = "supervisor"
    FAILURE_GRACE_S = 1.0

    def __init__(
        self,
        inbox: Inbox,
        context: zmq.asyncio.Context,
        layouts: list[Layout],  # the run's layouts (same world and replicas), the starting one first
        backend: str,  # "gloo" or "nccl"
        load_command: LoadCommand,
        listeners: list[Outbox],  # Scheduler and KVTier: told when the engine is ready
        scheduler: Outbox,
        heartbeat_timeout_s: float,
        on_ready: Callable[[list[WorkerReady]], None],
        on_failure: Callable[[str], None],
        can_load: asyncio.Event | None = None,  # set once what the load commands name exists (the weight store)
    ):
        super().__init__(inbox)
        self.context = context
        self.layouts = layouts
        self.layout = layout = layouts[0]
        self.backend = backend
        self.load_command = load_command
        self.listeners = listeners
        self.scheduler = scheduler
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.on_ready = on_ready
        self.report_failure = on_failure
        self.can_load = can_load
        self._load_later: asyncio.Task | None = None
        world = layout.world_size
        self.workers: list[Outbox | None] = [None] * world
        self.ready: dict[int, WorkerReady] = {}
        self.activity: dict[int, str] = {rank: "starting" for rank in range(world)}
        self.last_seen: dict[int, float] = {}
        self.failed: str | None = None
        self._failures: list[WorkerFailed] = []
        self._verdict: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None

    @property
    def addresses(self) -> list[str | None]:
        """Each rank's inbox, None until that worker joins."""
        return [worker.address if worker is not None else None for worker in self.workers]

    def handle(self, message):
        match message:
            case WorkerHello():
                self._on_worker_hello(message)
            case GroupsPrepared():
                self._load_all(message.collective)
            case WorkerReady():
                self._on_worker_ready(message)
            case WorkerFailed():
                self._on_worker_failed(message)
            case Heartbeat():
                if message.rank in self.last_seen:  # only workers that joined are watched
                    self.last_seen[message.rank] = time.monotonic()
            case WorkersBusy():
                for rank in message.ranks:
                    self.activity[rank] = message.activity
            case _:
                raise ValueError(f"{self.name} cannot handle {type(message).__name__}")

    def _on_worker_hello(self, message: WorkerHello) -> None:
        rank = message.rank
        if rank >= self.layout.world_size:
            log.warning("worker pid %d on %s asked for rank %d, but %s has %d workers; sending it away",
                        message.pid, message.hostname, rank, self.layout, self.layout.world_size)
            self._send_away(message.inbox)
            return
        if rank < 0:
            free = [r for r, address in enumerate(self.addresses) if address is None]
            if not free:
                log.warning("worker pid %d on %s joined a full world; sending it away", message.pid, message.hostname)
                self._send_away(message.inbox)
                return
            rank = free[-1]  # remote workers take the highest ranks; local ones are numbered from 0
        if self.addresses[rank] is not None:
            log.warning("a second worker claims rank %d; sending pid %d away", rank, message.pid)
            self._send_away(message.inbox)
            return
        log.info("worker %d is up (pid %d on %s, %s)", rank, message.pid, message.hostname, message.inbox)
        self.workers[rank] = Outbox(self.context, message.inbox)
        if message.rank < 0:
            self.workers[rank].send(RankAssigned(rank))
        self.last_seen[rank] = time.monotonic()
        self.activity[rank] = "waiting for the other workers"
        self._arm_watch()
        if all(address is not None for address in self.addresses):
            self._world_complete()

    def _send_away(self, address: str) -> None:
        outbox = Outbox(self.context, address)
        outbox.send(Shutdown())
        outbox.close()

    def _world_complete(self) -> None:
        if self.can_load is not None and not self.can_load.is_set():
            # Keep watching the workers (and telling them the head is alive) while waiting.
            self._load_later = asyncio.get_running_loop().create_task(self._load_when_allowed())
            return
        self._prepare_groups()

    async def _load_when_allowed(self) -> None:
        await self.can_load.wait()
        self._prepare_groups()

    def _prepare_groups(self) -> None:
        groups = [GroupSpec(key, ranks) for key, ranks in groups_of(*self.layouts)]
        if not groups:  # every worker alone in every group: nothing to communicate
            self._load_all(None)
            return
        self.workers[0].send(PrepareGroups(self.backend, self.layout.world_size, groups))

    def _load_all(self, collective: CollectiveSpec | None) -> None:
        for rank, worker in enumerate(self.workers):
            self.activity[rank] = "loading its shard of the model"
            worker.send(self.load_command(rank, collective))

    def _on_worker_ready(self, message: WorkerReady) -> None:
        log.info(
            "worker %d ready on %s in %.1f s: %s KV blocks",
            message.rank, message.device_name, message.load_s, message.num_device_blocks,
        )
        self.ready[message.rank] = message
        self.activity[message.rank] = "running steps"
        if len(self.ready) < self.layout.world_size:
            return
        per_replica = [
            min(min(self.ready[rank].num_device_blocks) for rank in self.layout.replica_ranks(replica))
            for replica in range(self.layout.dp)
        ]
        for listener in self.listeners:
            listener.send(EngineReady(per_replica, list(self.addresses)))
        self.on_ready([self.ready[rank] for rank in sorted(self.ready)])

    def _on_worker_failed(self, message: WorkerFailed) -> None:
        if self.failed is not None:
            return
        # A worker that dies takes its peers' collectives down with it; wait a moment so the
        # report names the worker that died, not a peer that noticed first.
        self._failures.append(message)
        if self._verdict is None:
            self._verdict = asyncio.get_running_loop().call_later(self.FAILURE_GRACE_S, self._fail_engine)

    def _fail_engine(self) -> None:
        self._verdict = None
        spoke = {f.rank for f in self._failures if f.activity}
        silent_deaths = [f for f in self._failures if not f.activity and f.rank not in spoke]
        first = (silent_deaths or self._failures)[0]
        doing = first.activity or self.activity.get(first.rank, "unknown")
        self.failed = f"worker {first.rank} failed while {doing}: {first.error}"
        log.error("%s", self.failed)
        self.scheduler.send(EngineFailed(self.failed))
        self.report_failure(self.failed)

    def _arm_watch(self) -> None:
        if self._watch is None:
            interval_s = min(1.0, self.heartbeat_timeout_s / 4)
            self._watch = asyncio.get_running_loop().call_later(interval_s, self._check_heartbeats)

    def _check_heartbeats(self) -> None:
        self._watch = None
        for worker in self.workers:
            if worker is not None:
                worker.send(HeadAlive())
        now = time.monotonic()
        for rank, seen in self.last_seen.items():
            if now - seen > self.heartbeat_timeout_s and self.failed is None:
                self._on_worker_failed(WorkerFailed(
                    rank, f"no heartbeat for {now - seen:.0f} s", self.activity.get(rank, "unknown")
                ))
        if self.failed is None and self._verdict is None:
            self._arm_watch()

    def shutdown_workers(self) -> None:
        for worker in self.workers:
            if worker is not None:
                worker.send(Shutdown())

    async def stop(self) -> None:
        for timer in (self._watch, self._verdict, self._load_later):
            if timer is not None:
                timer.cancel()
        await super().stop()
        for worker in self.workers:
            if worker is not None:
                worker.close()
