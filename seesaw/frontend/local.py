"""An in-process front door: submit requests from Python code in the head and await their results."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from seesaw.engine import Engine, EngineError
from seesaw.engine_client import EngineClient
from seesaw.frontend.choices import Choices, check_n, choice_samplings
from seesaw.messages import RequestFinished, RequestKind
from seesaw.sampling import SamplingParams
from seesaw.text import normalize_messages


@dataclass
class _Waiting:
    """A submitted request: its choices and the future its answer resolves."""

    choices: Choices
    future: asyncio.Future
    is_list: bool  # the future takes every choice's result (submit_choices), not the one (submit)


class LocalClient:
    """Use as `async with LocalClient(engine) as client: await client.generate(...)`."""

    def __init__(self, engine: Engine, name: str = "local"):
        self.engine = engine
        self._client = EngineClient(engine, name)
        self._waiting: dict[str, _Waiting] = {}  # by request id (each choice's)
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
               prompt_token_ids: list[int] | None = None, tools: list[dict] | None = None,
               tool_choice: str = "none") -> asyncio.Future:
        """Queue one request; the future resolves to its RequestFinished. Malformed chat messages
        raise ValueError here, naming the message."""
        return self._submit(sampling, 1, False, prompt, messages, prompt_token_ids, tools, tool_choice)

    def submit_choices(self, sampling: SamplingParams, n: int, *, prompt: str | None = None,
                       messages: list[dict] | None = None, prompt_token_ids: list[int] | None = None,
                       tools: list[dict] | None = None, tool_choice: str = "none") -> asyncio.Future:
        """Queue one request for `n` choices (the OpenAI `n`; see `seesaw.frontend.choices` for
        each choice's seed); the future resolves to their n RequestFinished in choice order, or, if
        a choice fails, to a list of that one (the others are cancelled). A bad `n` or malformed
        chat messages raise ValueError here, naming them."""
        return self._submit(sampling, check_n(n), True, prompt, messages, prompt_token_ids, tools, tool_choice)

    async def generate(self, sampling: SamplingParams, **prompt) -> RequestFinished:
        return await self.submit(sampling, **prompt)

    async def generate_choices(self, sampling: SamplingParams, n: int, **prompt) -> list[RequestFinished]:
        return await self.submit_choices(sampling, n, **prompt)

    def _submit(self, sampling: SamplingParams, n: int, is_list: bool, prompt: str | None,
                messages: list[dict] | None, prompt_token_ids: list[int] | None,
                tools: list[dict] | None = None, tool_choice: str = "none") -> asyncio.Future:
        kind = RequestKind.CHAT if messages is not None else RequestKind.COMPLETION
        if messages is not None:
            messages = normalize_messages(messages)
        future = asyncio.get_running_loop().create_future()
        request_ids = [self._client.submit(kind, choice, prompt=prompt, messages=messages,
                                           prompt_token_ids=prompt_token_ids, tools=tools, tool_choice=tool_choice)
                       for choice in choice_samplings(sampling, n)]
        waiting = _Waiting(Choices(request_ids), future, is_list)
        for request_id in request_ids:
            self._waiting[request_id] = waiting
        return future

    async def _receive(self) -> None:
        """Resolve futures as results arrive; if the engine dies with requests still here (an actor
        that would have answered them died with it), fail them."""
        try:
            while True:
                self._resolve(await self._client.receive())
        except EngineError as error:
            self._fail_all(error)

    def _resolve(self, message) -> None:
        if not isinstance(message, RequestFinished):
            return
        waiting = self._waiting.pop(message.request_id, None)
        if waiting is None or not waiting.choices.take(message):
            return
        if waiting.choices.failure is not None:
            for request_id in waiting.choices.unfinished_ids:
                self._client.cancel(request_id)  # their answers come back and are let go
        answer = waiting.choices.answer
        if not waiting.future.done():
            waiting.future.set_result(answer if waiting.is_list else answer[0])

    def _fail_all(self, error: Exception) -> None:
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(error)
        self._waiting.clear()
