"""An in-process front door: submit requests from Python code in the head and await their
results, or read their text as it grows."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from seesaw.engine import Engine, EngineError
from seesaw.engine_client import EngineClient
from seesaw.frontend.choices import Choices, check_n, choice_samplings
from seesaw.messages import RequestFinished, RequestKind, StatsReport, TextDeltas
from seesaw.sampling import SamplingParams
from seesaw.stats import EngineStats
from seesaw.text import normalize_messages


@dataclass(eq=False)  # one object per request: kept in sets by identity
class Submission:
    """One request in the engine: its choices, the future of its answer (every choice's result
    in choice order, or the one that failed), and, when streamed, its new text as it arrives."""

    choices: Choices
    future: asyncio.Future
    deltas: asyncio.Queue | None = None  # (choice index, text), then None once the answer is in
    is_list: bool = True  # the future takes every choice's result (not only the first)
    _sent_end: bool = field(default=False, repr=False)

    def __aiter__(self):
        return self._texts()

    async def _texts(self):
        """(choice index, new text) as the engine streams it; ends once the request is decided."""
        while (delta := await self.deltas.get()) is not None:
            yield delta

    def end(self) -> None:
        if self.deltas is not None and not self._sent_end:
            self._sent_end = True
            self.deltas.put_nowait(None)


class LocalClient:
    """Use as `async with LocalClient(engine) as client: await client.generate(...)`."""

    def __init__(self, engine: Engine, name: str = "local"):
        self.engine = engine
        self._client = EngineClient(engine, name)
        self._waiting: dict[str, Submission] = {}  # by request id (each choice's)
        self._stats: dict[int, asyncio.Future] = {}  # by query id
        self._query_ids = itertools.count()
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
        return self.open_request(sampling, 1, prompt=prompt, messages=messages, prompt_token_ids=prompt_token_ids,
                                 tools=tools, tool_choice=tool_choice, is_list=False).future

    def submit_choices(self, sampling: SamplingParams, n: int, *, prompt: str | None = None,
                       messages: list[dict] | None = None, prompt_token_ids: list[int] | None = None,
                       tools: list[dict] | None = None, tool_choice: str = "none") -> asyncio.Future:
        """Queue one request for `n` choices (the OpenAI `n`; see `seesaw.frontend.choices` for
        each choice's seed); the future resolves to their n RequestFinished in choice order, or, if
        a choice fails, to a list of that one (the others are cancelled). A bad `n` or malformed
        chat messages raise ValueError here, naming them."""
        return self.open_request(sampling, check_n(n), prompt=prompt, messages=messages,
                                 prompt_token_ids=prompt_token_ids, tools=tools, tool_choice=tool_choice).future

    async def generate(self, sampling: SamplingParams, **prompt) -> RequestFinished:
        return await self.submit(sampling, **prompt)

    async def generate_choices(self, sampling: SamplingParams, n: int, **prompt) -> list[RequestFinished]:
        return await self.submit_choices(sampling, n, **prompt)

    def open_request(self, sampling: SamplingParams, n: int, *, prompt: str | None = None,
                     messages: list[dict] | None = None, prompt_token_ids: list[int] | None = None,
                     tools: list[dict] | None = None, tool_choice: str = "none", stream: bool = False,
                     is_list: bool = True) -> Submission:
        """Queue one request of `n` choices; with `stream`, iterate the Submission for its text as
        it grows. Raises EngineError at once if the engine has failed, ValueError for malformed
        chat messages."""
        if self.engine.failure is not None or self._task is None or self._task.done():
            raise EngineError(self.engine.failure or "the client is closed")
        kind = RequestKind.CHAT if messages is not None else RequestKind.COMPLETION
        if messages is not None:
            messages = normalize_messages(messages)
        request_ids = [self._client.submit(kind, choice, prompt=prompt, messages=messages,
                                           prompt_token_ids=prompt_token_ids, tools=tools, tool_choice=tool_choice,
                                           stream=stream)
                       for choice in choice_samplings(sampling, n)]
        submission = Submission(Choices(request_ids), asyncio.get_running_loop().create_future(),
                                asyncio.Queue() if stream else None, is_list)
        for request_id in request_ids:
            self._waiting[request_id] = submission
        return submission

    def cancel(self, submission: Submission) -> None:
        """Stop every choice of a request still running; each is answered as cancelled."""
        for request_id in submission.choices.unfinished_ids:
            self._client.cancel(request_id)

    async def stats(self, with_timeline: bool = False, timeout_s: float = 10.0) -> EngineStats:
        """The engine's live stats; TimeoutError if no answer comes within `timeout_s`."""
        query_id = next(self._query_ids)
        future = self._stats[query_id] = asyncio.get_running_loop().create_future()
        try:
            self._client.ask_stats(query_id, with_timeline)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._stats.pop(query_id, None)

    async def _receive(self) -> None:
        """Resolve futures as results arrive; if the engine dies with requests still here (an actor
        that would have answered them died with it), fail them."""
        try:
            while True:
                self._resolve(await self._client.receive())
        except EngineError as error:
            self._fail_all(error)

    def _resolve(self, message) -> None:
        match message:
            case TextDeltas():
                for delta in message.deltas:
                    submission = self._waiting.get(delta.request_id)
                    if submission is not None and submission.deltas is not None and not submission.choices.is_decided:
                        submission.deltas.put_nowait((submission.choices.index(delta.request_id), delta.text))
            case StatsReport():
                future = self._stats.get(message.query_id)
                if future is not None and not future.done():
                    future.set_result(message.stats)
            case RequestFinished():
                self._finish(message)

    def _finish(self, message: RequestFinished) -> None:
        submission = self._waiting.pop(message.request_id, None)
        if submission is None or not submission.choices.take(message):
            return
        if submission.choices.failure is not None:
            for request_id in submission.choices.unfinished_ids:
                self._client.cancel(request_id)  # their answers come back and are let go
        answer = submission.choices.answer
        if not submission.future.done():
            submission.future.set_result(answer if submission.is_list else answer[0])
        submission.end()

    def _fail_all(self, error: Exception) -> None:
        for submission in self._waiting.values():
            if not submission.future.done():
                submission.future.set_exception(error)
            submission.end()
        self._waiting.clear()
        for future in self._stats.values():
            if not future.done():
                future.set_exception(error)
