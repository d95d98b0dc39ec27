"""The actor lifecycle in one place: start, receive one message at a time, stop, fail loudly."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from abc import ABC, abstractmethod

from seesaw.messages import Message
from seesaw.transport.channels import Inbox

log = logging.getLogger(__name__)


class Actor(ABC):
    """An asyncio task draining one inbox into `handle`; subclasses implement `handle`."""

    name = "actor"

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        self.task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        return self.task

    async def run(self) -> None:
        try:
            while True:
                try:
                    message = await self.inbox.recv()
                except ValueError as error:  # a frame that is not one of our messages
                    log.warning("%s dropped %s", self.name, error)
                    continue
                result = self.handle(message)
                if inspect.isawaitable(result):
                    await result
        except asyncio.CancelledError:
            raise
        except Exception:  # the actor boundary: log and end; the task's exception reaches its watcher
            log.exception("%s failed", self.name)
            raise

    @abstractmethod
    def handle(self, message: Message):
        """React to one message; may return an awaitable."""

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():  # a finished task was awaited by its watcher
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.inbox.close()
