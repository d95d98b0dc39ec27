"""The actor lifecycle in one place: start, receive one message at a time, stop, fail loudly."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from abc import ABC, abstractmethod

import zmq.asyncio

from seesaw.messages import Message
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


class Actor(ABC):
    """An asyncio task draining one inbox into `handle`. Subclasses name the message types their
    inbox takes in `accepts` (a union from seesaw.messages) and implement `handle`; the inbox
    decodes only those, and anything else is dropped with a warning. Outboxes made with `connect`
    are closed when the actor stops."""

    name = "actor"
    accepts: typing.Any = Message  # any message, until a subclass names its inbox's union

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        if inbox is not None:  # None: a test drives `handle` directly
            inbox.accept(self.accepts)
        self.task: asyncio.Task | None = None
        self._owned: list[Outbox] = []

    def connect(self, context: zmq.asyncio.Context, address: str) -> Outbox:
        """An outbox this actor owns: closed at stop (or earlier with `disconnect`)."""
        outbox = Outbox(context, address)
        self._owned.append(outbox)
        return outbox

    def disconnect(self, outbox: Outbox) -> None:
        """Close an owned outbox now; what it was still sending gets a moment to go out."""
        if outbox in self._owned:
            self._owned.remove(outbox)
        outbox.close()

    def start(self) -> asyncio.Task:
        self.task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        return self.task

    async def run(self) -> None:
        try:
            while True:
                try:
                    message = await self.inbox.recv()
                except ValueError as error:  # a frame that is not one of the messages this actor takes
                    log.warning("%s dropped a frame: %s", self.name, error)
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
        """React to one message of `accepts`; may return an awaitable."""

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():  # a finished task was awaited by its watcher
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.inbox.close()
        for outbox in self._owned:
            outbox.close(linger_s=0)
        self._owned.clear()
