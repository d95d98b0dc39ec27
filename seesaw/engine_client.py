"""The one way into a running engine for a front door (the batch runner, the daemon, in-process
use): submit requests and cancel them, ask for stats, and take the engine's replies, or learn
that the engine failed. No front door opens the engine's sockets itself."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets

from seesaw.engine import Engine, EngineError
from seesaw.messages import CancelRequest, QueryStats, RequestKind, Submit, ToFrontDoor
from seesaw.sampling import SamplingParams
from seesaw.transport.channels import Inbox, Outbox


class EngineClient:
    """A front door's channel to one engine: `open()` (or `async with`) before use, `close()` after.

    `submit` names each request with an id unique in the engine (this client's name and a count):
    the one id the request has inside the engine, which its replies carry and `cancel` takes.
    Replies are `RequestFinished`, `TextDeltas` (streamed requests) and `StatsReport`; `receive`
    raises EngineError once the engine has failed."""

    def __init__(self, engine: Engine, name: str):
        self.engine = engine
        self.name = f"{name}-{secrets.token_hex(4)}"
        self._next_ids = itertools.count()
        self._replies: Inbox | None = None
        self._queue: Outbox | None = None
        self._scheduler: Outbox | None = None
        self._failed: asyncio.Future | None = None  # resolves when the engine fails (made on the first wait)

    def open(self) -> EngineClient:
        context = self.engine.context
        self._replies = Inbox(context, self.engine.reply_address(self.name))
        self._replies.accept(ToFrontDoor)
        self._queue = Outbox(context, self.engine.request_queue_address)
        self._scheduler = Outbox(context, self.engine.scheduler_address)
        return self

    def close(self) -> None:
        if self._failed is not None:
            self._failed.cancel()
            self._failed = None
        for outbox in (self._queue, self._scheduler):
            if outbox is not None:
                outbox.close(linger_s=0)
        if self._replies is not None:
            self._replies.close()
        self._queue = self._scheduler = self._replies = None

    async def __aenter__(self) -> EngineClient:
        return self.open()

    async def __aexit__(self, *exc) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._queue is not None

    @property
    def failure(self) -> str | None:
        """Why the engine cannot go on, once it cannot."""
        return self.engine.failure

    # ------------------------------------------------------------ to the engine

    def submit(self, kind: RequestKind, sampling: SamplingParams, *, prompt: str | None = None,
               messages: list[dict] | None = None, prompt_token_ids: list[int] | None = None,
               stream: bool = False, tools: list[dict] | None = None, tool_choice: str = "none") -> str:
        """Queue one request; returns its id, which its RequestFinished (and, streamed, its TextDeltas) carry."""
        request_id = f"{self.name}-{next(self._next_ids)}"
        self._queue.send(Submit(request_id, self._reply_to, kind, sampling, prompt, messages, prompt_token_ids, stream,
                                tools, tool_choice))
        return request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request this client submitted; it is answered with finish_reason cancelled."""
        if self._queue is not None:
            self._queue.send(CancelRequest(request_id))

    def ask_stats(self, query_id: int, with_timeline: bool = False) -> None:
        """Ask for the engine's live counts; a StatsReport with `query_id` comes back."""
        self._scheduler.send(QueryStats(query_id, self._reply_to, with_timeline))

    @property
    def _reply_to(self) -> str:
        return self._replies.addresses[0]

    # ------------------------------------------------------------ from the engine

    def receive_nowait(self) -> ToFrontDoor | None:
        """A reply already here, or None (never waits)."""
        return self._replies.recv_nowait()

    async def receive(self, timeout_s: float | None = None, watch_failure: bool = True) -> ToFrontDoor | None:
        """The next reply; None after `timeout_s` seconds without one (None: wait for one). Raises
        EngineError once the engine has failed and no reply is here to take (`watch_failure`
        False: only replies, such as the failure's own answers to what was in flight)."""
        message = self._replies.recv_nowait()
        if message is not None:
            return message
        if not watch_failure:
            try:
                return await self._replies.recv(timeout_s)
            except TimeoutError:
                return None
        if self.engine.failure is not None:
            raise EngineError(self.engine.failure)
        if self._failed is None:
            self._failed = asyncio.ensure_future(self.engine.failed.wait())
        failed = self._failed
        receiving = asyncio.ensure_future(self._replies.recv())
        done, _ = await asyncio.wait([receiving, failed], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if receiving in done:
            return receiving.result()
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        if failed in done:
            raise EngineError(self.engine.failure)
        return None
