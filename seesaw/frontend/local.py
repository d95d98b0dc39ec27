"""An in-process front door: submit requests from Python code in the head and await their results."""

from __future__ import annotations

import asyncio

from seesaw.engine import Engine, EngineError
from seesaw.engine_client import EngineClient
from seesaw.messages import RequestFinished, RequestKind
from seesaw.sampling import SamplingParams
from seesaw.text import normalize_messages


class LocalClient:
    """Use as `async with LocalClient(engine) as client: await client.generate(...)`."""

    def __init__(self, engine: Engine, name: str = "local"):
        self.engine = engine
        self._client = EngineClient(engine, name)
        self._futures: dict[str, asyncio.Future] = {}  # by request id
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> LocalClient:
        self._client.open()
        self._task = asyncio.get_running_loop().create_task(self._receive())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._client.close()
        self._fail_all(EngineError("the client closed before the request finished"))

    def submit(self, sampling: SamplingParams, *, prompt: str | None = None, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its RequestFinished. Malformed chat messages
        raise ValueError here, naming the message."""
        kind = RequestKind.CHAT if messages is not None else RequestKind.COMPLETION
        if messages is not None:
            messages = normalize_messages(messages)
        future = asyncio.get_running_loop().create_future()
        request_id = self._client.submit(kind, sampling, prompt=prompt, messages=messages,
                                         prompt_token_ids=prompt_token_ids)
        self._futures[request_id] = future
        return future

    async def generate(self, sampling: SamplingParams, **prompt) -> RequestFinished:
        return await self.submit(sampling, **prompt)

    async def _receive(self) -> None:
        """Resolve futures as results arrive; if the engine dies with requests still here (an actor
        that would have answered them died with it), fail them."""
        try:
            while True:
                self._resolve(await self._client.receive())
        except EngineError as error:
            self._fail_all(error)

    def _resolve(self, message) -> None:
        if isinstance(message, RequestFinished):
            future = self._futures.pop(message.request_id, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _fail_all(self, error: Exception) -> None:
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
