"""Supervisor actor: brings the workers up, watches them, and fails the engine loudly when one is lost.

Inbox: WorkerHello, WorkerReady, WorkerFailed, Heartbeat (ShardWorker, or the engine's process watch).
Sends: LoadShard and Shutdown to workers; EngineReady and EngineFailed to the Scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from seesaw.actors.base import Actor
from seesaw.messages import (
    EngineFailed,
    EngineReady,
    Heartbeat,
    LoadShard,
    Shutdown,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
)
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


class Supervisor(Actor):
    name = "supervisor"

    def __init__(
        self,
        inbox: Inbox,
        load_commands: list[LoadShard],
        workers: list[Outbox],
        scheduler: Outbox,
        heartbeat_timeout_s: float,
        on_ready: Callable[[list[WorkerReady]], None],
        on_failure: Callable[[str], None],
    ):
        super().__init__(inbox)
        self.load_commands = load_commands
        self.workers = workers
        self.scheduler = scheduler
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.on_ready = on_ready
        self.report_failure = on_failure
        self.ready: dict[int, WorkerReady] = {}
        self.activity: dict[int, str] = {rank: "starting" for rank in range(len(workers))}
        self.last_seen: dict[int, float] = {}
        self.failed: str | None = None
        self._watch: asyncio.TimerHandle | None = None

    def handle(self, message):
        match message:
            case WorkerHello():
                self._on_worker_hello(message)
            case WorkerReady():
                self._on_worker_ready(message)
            case WorkerFailed():
                self._on_worker_failed(message)
            case Heartbeat():
                self.last_seen[message.rank] = time.monotonic()
            case _:
                raise ValueError(f"{self.name} cannot handle {type(message).__name__}")

    def _on_worker_hello(self, message: WorkerHello) -> None:
        log.info("worker %d is up (pid %d on %s)", message.rank, message.pid, message.hostname)
        self.last_seen[message.rank] = time.monotonic()
        self.activity[message.rank] = "loading its shard of the model"
        self.workers[message.rank].send(self.load_commands[message.rank])
        self._arm_watch()

    def _on_worker_ready(self, message: WorkerReady) -> None:
        log.info(
            "worker %d ready on %s in %.1f s: %d KV blocks",
            message.rank, message.device_name, message.load_s, message.num_device_blocks,
        )
        self.ready[message.rank] = message
        self.activity[message.rank] = "running steps"
        if len(self.ready) == len(self.workers):
            self.scheduler.send(EngineReady(min(r.num_device_blocks for r in self.ready.values())))
            self.on_ready(list(self.ready.values()))

    def _on_worker_failed(self, message: WorkerFailed) -> None:
        if self.failed is not None:
            return
        doing = message.activity or self.activity.get(message.rank, "unknown")
        self.failed = f"worker {message.rank} failed while {doing}: {message.error}"
        log.error("%s", self.failed)
        self.scheduler.send(EngineFailed(self.failed))
        self.report_failure(self.failed)

    def _arm_watch(self) -> None:
        if self._watch is None:
            interval_s = min(1.0, self.heartbeat_timeout_s / 4)
            self._watch = asyncio.get_running_loop().call_later(interval_s, self._check_heartbeats)

    def _check_heartbeats(self) -> None:
        self._watch = None
        now = time.monotonic()
        for rank, seen in self.last_seen.items():
            if now - seen > self.heartbeat_timeout_s and self.failed is None:
                self._on_worker_failed(WorkerFailed(
                    rank, f"no heartbeat for {now - seen:.0f} s", self.activity.get(rank, "unknown")
                ))
        if self.failed is None:
            self._arm_watch()

    def shutdown_workers(self) -> None:
        for worker in self.workers:
            worker.send(Shutdown())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await super().stop()
