"""An in-process front door: submit requests from Python code in the head and await their results."""

from __future__ import annotations

import asyncio
import itertools
import secrets

from seesaw.engine import Engine, EngineError
from seesaw.messages import RequestFinished, Submit
from seesaw.sampling import SamplingParams
from seesaw.transport.channels import Inbox, Outbox


class LocalClient:
    """Use as `async with LocalClient(engine) as client: await client.generate(...)`."""

    def __init__(self, engine: Engine, name: str = "local"):
        self.engine = engine
        self.name = f"{name}-{secrets.token_hex(4)}"
        self._futures: dict[str, asyncio.Future] = {}
        self._next_id = itertools.count()
        self._replies: Inbox | None = None
        self._queue: Outbox | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> LocalClient:
        self._replies = Inbox(self.engine.context, self.engine.reply_address(self.name))
        self._queue = Outbox(self.engine.context, self.engine.request_queue_address)
        self._task = asyncio.get_running_loop().create_task(self._receive())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._queue.close(linger_s=0)
        self._replies.close()
        for future in self._futures.values():
            if not future.done():
                future.set_exception(EngineError("the client closed before the request finished"))

    def submit(self, sampling: SamplingParams, *, prompt: str | None = None, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its RequestFinished."""
        request_id = f"{self.name}-{next(self._next_id)}"
        future = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        kind = "chat" if messages is not None else "completion"
        self._queue.send(Submit(request_id, self._replies.addresses[0], kind, sampling, prompt, messages, prompt_token_ids))
        return future

    async def generate(self, sampling: SamplingParams, **prompt) -> RequestFinished:
        return await self.submit(sampling, **prompt)

    async def _receive(self) -> None:
        while True:
            try:
                message = await self._replies.recv(timeout_s=1.0)
            except TimeoutError:
                if self.engine.failure is not None:
                    self._fail_all(EngineError(self.engine.failure))
                continue
            future = self._futures.pop(message.request_id, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _fail_all(self, error: Exception) -> None:
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
