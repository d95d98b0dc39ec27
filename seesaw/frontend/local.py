"""An in-process front door: submit requests from Python code in the head and await their results."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets

from seesaw.engine import Engine, EngineError
from seesaw.messages import RequestFinished, RequestKind, Submit
from seesaw.sampling import SamplingParams
from seesaw.transport.channels import Inbox, Outbox


class LocalClient:
    """Use as `async with LocalClient(engine) as client: await client.generate(...)`."""

    def __init__(self, engine: Engine, name: str = "local"):
        self.engine = engine
        self.name = f"{name}-{secrets.token_hex(4)}"
        self._futures: dict[str, asyncio.Future] = {}  # by label
        self._next_labels = itertools.count()
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
        self._fail_all(EngineError("the client closed before the request finished"))

    def submit(self, sampling: SamplingParams, *, prompt: str | None = None, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its RequestFinished."""
        label = str(next(self._next_labels))
        future = asyncio.get_running_loop().create_future()
        self._futures[label] = future
        kind = RequestKind.CHAT if messages is not None else RequestKind.COMPLETION
        self._queue.send(Submit(label, self._replies.addresses[0], kind, sampling, prompt, messages, prompt_token_ids))
        return future

    async def generate(self, sampling: SamplingParams, **prompt) -> RequestFinished:
        return await self.submit(sampling, **prompt)

    async def _receive(self) -> None:
        """Resolve futures as results arrive; if the engine dies with requests still here (an actor
        that would have answered them died with it), fail them."""
        failed = asyncio.ensure_future(self.engine.failed.wait())
        try:
            while True:
                message = asyncio.ensure_future(self._replies.recv())
                await asyncio.wait([message, failed], return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    message.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await message
                    self._fail_all(EngineError(self.engine.failure))
                    return
                self._resolve(message.result())
        finally:
            failed.cancel()

    def _resolve(self, message) -> None:
        if isinstance(message, RequestFinished):
            future = self._futures.pop(message.label, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _fail_all(self, error: Exception) -> None:
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
