"""What `seesaw-cli serve` needs of each daemon front door (the ZeroMQ socket, the HTTP API):
start, drain, abandon, close, and a way to say it cannot go on."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class FrontDoor:
    """A daemon front door. `failure` says why it cannot go on once `failed` is set: a task it
    runs (given to `watch`) ended with an exception."""

    name = "the server"

    def __init__(self):
        self.failure: str | None = None
        self.failed = asyncio.Event()

    def watch(self, task: asyncio.Task) -> asyncio.Task:
        task.add_done_callback(self._on_task_done)
        return task

    def _on_task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = f"{task.get_name()} failed: {task.exception()!r}"
            log.error("%s cannot go on: %s", self.name, self.failure)
            self.failed.set()

    async def start(self) -> None:
        raise NotImplementedError

    async def drain(self, timeout_s: float, reason: str | None = None, code: str = "shutting_down") -> int:
        """Take nothing new, let what is in flight finish within `timeout_s`, fail the rest; how many failed."""
        raise NotImplementedError

    async def abandon(self, reason: str, code: str = "shutting_down") -> int:
        """Fail everything in flight with `reason`; how many there were."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
