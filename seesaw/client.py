"""Clients of the `seesaw-cli serve` daemon (docs/protocol.md): `AsyncClient` over zmq.asyncio, and
`Client`, the same calls blocking."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import orjson
import zmq
import zmq.asyncio

from seesaw import protocol_terms as terms
from seesaw.config import is_loopback
from seesaw.transport.curve import default_address, no_socket_hint, read_public, secure_client

log = logging.getLogger(__name__)

HIGH_WATER_MARK = 10_000
MAX_BACKOFF_S = 5.0


class ServerError(Exception):
    """The server's `error` frame: its `code` (e.g. "busy"), HTTP-like `status` and `message`."""

    def __init__(self, code: str, status: int, message: str):
        super().__init__(f"{code} ({status}): {message}")
        self.code, self.status, self.message = code, status, message

    @classmethod
    def from_frame(cls, frame: dict, note: str = "") -> ServerError:
        return cls(str(frame.get("code")), int(frame.get("status") or 0), str(frame.get("message", "")) + note)


def backoff_s(retry_after_s: Any, attempt: int, jitter: float) -> float:
    """Seconds to wait before retry `attempt` (from 0) of a busy request: the server's hint doubled
    per attempt and capped at MAX_BACKOFF_S (never below the hint), plus up to 10 % (`jitter` in [0, 1))."""
    base = float(retry_after_s) if isinstance(retry_after_s, (int, float)) and retry_after_s > 0 else 0.1
    return max(base, min(MAX_BACKOFF_S, base * 2**attempt)) * (1 + 0.1 * jitter)


class TokenStream:
    """`async for text in client.stream(body)`: the `text` of each token frame; once the loop ends,
    `.response` holds the result's response. `.id` names the request (for `cancel`). A body with
    `n` > 1 streams its choices' pieces interleaved: `.index` is the choice of the piece just
    yielded. Used as
    `async with client.stream(body) as stream:`, leaving the block early (a `break`, an error)
    cancels the request on the server, as `aclose()` does."""

    def __init__(self, request_id: str, frames: AsyncIterator[dict], on_end: Callable[[Any], None]):
        self.id, self.response, self.job_id, self.summary = request_id, None, None, None
        self.index = 0  # the choice the latest piece belongs to
        self._frames, self._on_end = frames, on_end

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            frame = await anext(self._frames)
            value = self._take(frame)
            if value is not None:
                return value
            if frame["type"] in terms.FINAL_FRAME_TYPES:
                self._on_end(self)
                await self._frames.aclose()
                raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop early; the server is asked to cancel the request."""
        await self._frames.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()  # nothing to do if the stream ended; a cancel if it did not

    def _take(self, frame: dict) -> str | None:
        if frame["type"] == "token":
            self.index = frame.get("index", 0)
            return frame.get("text", "")
        self.response = frame.get("response")
        return None


class JobRun(TokenStream):
    """`async for line in client.run_job(path)`: each output line (a dict) as the job answers it;
    once the loop ends, `.summary` holds the job_done counts. `.id` and `.job_id` name the job."""

    def _take(self, frame: dict) -> dict | None:
        if frame["type"] == "job_line":
            return frame["line"]
        if frame["type"] == "job":
            self.job_id = frame.get("job_id")
        elif frame["type"] == "job_done":
            self.summary = {key: value for key, value in frame.items() if key not in ("v", "type")}
        return None


class AsyncClient:
    """Requests to the daemon at `address` (default: `default_address()`) over one DEALER socket;
    any number may be outstanding at once. A busy server is retried up to `max_retries` times with
    backoff; every wait for the server ends after `timeout_s` with a TimeoutError."""

    def __init__(self, address: str | None = None, server_key: str | bytes | None = None,
                 timeout_s: float = 600.0, max_retries: int = 8):
        if timeout_s <= 0 or max_retries < 0:
            raise ValueError(f"timeout_s must be positive and max_retries not negative, got {timeout_s}, {max_retries}")
        self.address = address or default_address()
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.last_result: dict | None = None  # of the latest request to finish (see TokenStream.response)
        self.last_job_summary: dict | None = None  # of the latest job to finish (see JobRun.summary)
        server_public = _server_public(server_key, self.address)
        self._context = zmq.asyncio.Context()
        self._socket = _dealer(self._context, self.address, server_public)
        self._id_prefix, self._id_counter = secrets.token_hex(4), itertools.count(1)
        self._random = random.Random()
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its replies
        self._jobs: dict[str, asyncio.Queue] = {}  # job_id -> the queue of the batch that started it
        self._cancels: dict[str, list[asyncio.Future]] = {}  # cancelled id or job_id -> cancels waiting
        self._receiver: asyncio.Task | None = None
        self._is_closed = False

    async def complete(self, body: dict, endpoint: str = "completions", stream: bool = False) -> dict:
        """The response of one request (token frames, when streamed, are read and dropped)."""
        frame = await self._ask(_submit(self._new_id(), endpoint, body, stream), "result")
        self.last_result = frame.get("response")
        return self.last_result

    def stream(self, body: dict, endpoint: str = "chat") -> TokenStream:
        """The request streamed: iterate for the text pieces, then read `.response`."""
        frame = _submit(self._new_id(), endpoint, body, True)
        return TokenStream(frame["id"], self._frames(frame), lambda done: setattr(self, "last_result", done.response))

    async def submit_many(self, requests: list[tuple[str, dict]], window: int = 64) -> list[dict | ServerError]:
        """(endpoint, body) requests with up to `window` outstanding; results in input order, each a
        response or the ServerError it got."""
        results: list[Any] = [None] * len(requests)
        indices = iter(range(len(requests)))

        async def work() -> None:
            for index in indices:  # shared: each index goes to one worker
                endpoint, body = requests[index]
                try:
                    results[index] = await self.complete(body, endpoint)
                except ServerError as error:
                    results[index] = error

        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        workers = [asyncio.ensure_future(work()) for _ in range(min(window, len(requests)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        return results

    def run_job(self, path: Path | None = None, lines: list[str] | None = None, max_pending: int | None = None) -> JobRun:
        """A batch job over a JSONL file the server can read (`path`) or over `lines` sent inline."""
        if (path is None) == (lines is None):
            raise ValueError("run_job takes exactly one of path and lines")
        source = {"path": str(Path(path).resolve())} if path is not None else {"lines": list(lines)}
        frame = _frame("batch", id=self._new_id(), **source)
        if max_pending is not None:
            frame["max_pending"] = max_pending
        return JobRun(frame["id"], self._frames(frame), lambda done: setattr(self, "last_job_summary", done.summary))

    async def job_status(self, job_id: str) -> dict:
        frame = await self._ask(_frame("job_status", id=self._new_id(), job_id=job_id), "job_status")
        return {key: value for key, value in frame.items() if key not in ("v", "type", "id")}

    async def stats(self) -> dict:
        frame = await self._ask(_frame("stats", id=self._new_id()), "stats")
        return frame.get("stats", {})

    async def cancel(self, id: str | None = None, job_id: str | None = None) -> int:
        """Cancel a request or batch (`id`, as `.id` of a stream or job names it) or a job (`job_id`);
        returns how many requests the server stopped."""
        if (id is None) == (job_id is None):
            raise ValueError("cancel takes exactly one of id and job_id")
        target, field = (id, "id") if id is not None else (job_id, "job_id")
        self._start()
        waiter = asyncio.get_running_loop().create_future()
        self._cancels.setdefault(target, []).append(waiter)
        what = f"cancel of {target}"
        try:
            await self._send(_frame("cancel", **{field: target}), what)
            frame = await self._wait(waiter, what)
        finally:
            waiters = self._cancels.get(target, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._cancels.pop(target, None)
        if frame.get("type") == "error":
            raise ServerError.from_frame(frame)
        return int(frame.get("num_requests", 0))

    async def close(self) -> None:
        """Close the socket; requests still waiting fail with ConnectionError."""
        if self._is_closed:
            return
        self._is_closed = True
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.wait([self._receiver], timeout=self.timeout_s)
        self._fail_all(lambda: ConnectionError(f"the client of {self.address} was closed during the request"))
        self._context.destroy(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._id_counter)}"

    async def _ask(self, frame: dict, answer_type: str) -> dict:
        """The final reply to `frame`, checked to be of `answer_type`."""
        async with aclosing(self._frames(frame)) as frames:
            replies = [reply async for reply in frames]  # tokens (if any), then the answer
        last = replies[-1] if replies else None
        if last is None or last.get("type") != answer_type:
            raise ServerError("protocol", 0, f"{self.address} answered a {frame['type']} with {last and last.get('type')}")
        return last

    async def _frames(self, frame: dict) -> AsyncIterator[dict]:
        """Send `frame`, then yield every reply about it up to the final one, sending it again
        while the server is busy. Leaving early asks the server to cancel it."""
        self._start()
        request_id, what = frame["id"], f"{frame['type']} request {frame['id']}"
        queue = self._queues[request_id] = asyncio.Queue()
        is_finished, attempts = False, 0
        try:
            await self._send(frame, what)
            while not is_finished:
                reply = await self._next(queue, what)
                kind = reply["type"]
                if kind == "error" and reply.get("code") == terms.BUSY and attempts < self.max_retries:
                    await asyncio.sleep(backoff_s(reply.get("retry_after_s"), attempts, self._random.random()))
                    attempts += 1
                    await self._send(frame, what)
                    continue
                is_finished = kind in terms.FINAL_FRAME_TYPES or kind == "error"
                if kind == "error":
                    raise ServerError.from_frame(reply, f" (after {attempts} retries)" if attempts else "")
                yield reply
        finally:
            self._queues.pop(request_id, None)
            for job_id in [job_id for job_id, job_queue in self._jobs.items() if job_queue is queue]:
                del self._jobs[job_id]
            if not is_finished:
                await self._send_quietly(_frame("cancel", id=request_id))

    def _start(self) -> None:
        if self._is_closed:
            raise RuntimeError(f"the client of {self.address} is closed")
        if self._receiver is None:
            self._receiver = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        """The one reader of the socket: hands each frame to whoever waits for it."""
        try:
            while True:
                self._dispatch(_decode(await self._socket.recv_multipart()))
        except zmq.ZMQError as error:
            reason = f"the connection to {self.address} failed: {error}"
            self._fail_all(lambda: ConnectionError(reason))

    def _dispatch(self, frame: dict | None) -> None:
        if frame is None:
            return
        kind, frame_id = frame.get("type"), frame.get("id")
        if kind == "cancelled" or (kind == "error" and frame_id in self._cancels and frame_id not in self._queues):
            self._answer_cancel(frame)
        elif kind == "error" and frame_id is None:  # about a frame of ours the server could not read
            self._fail_all(lambda: ServerError.from_frame(frame))
        elif (queue := self._queue_for(kind, frame)) is not None:
            queue.put_nowait(frame)
        else:
            log.debug("dropped a %s frame about %s: nobody waits for it", kind, frame_id or frame.get("job_id"))

    def _queue_for(self, kind: str, frame: dict) -> asyncio.Queue | None:
        """A job's lines go by job_id to the queue of the batch that started it; the rest by id."""
        if kind in ("job_line", "job_done"):
            return self._jobs.get(frame.get("job_id"))
        queue = self._queues.get(frame.get("id"))
        if kind == "job" and queue is not None:
            self._jobs[frame.get("job_id")] = queue
        return queue

    def _answer_cancel(self, frame: dict) -> None:
        """A `cancelled` frame goes to the oldest cancel waiting for its job_id or id."""
        key = frame.get("job_id") if frame.get("job_id") is not None else frame.get("id")
        waiters = self._cancels.get(key, [])
        if waiters:  # a cancel sent by leaving a stream early has no waiter: its answer is dropped
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(frame)

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        for queue in self._queues.values():
            queue.put_nowait(make_error())
        for waiters in self._cancels.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(make_error())

    async def _next(self, queue: asyncio.Queue, what: str) -> dict:
        item = await self._wait(queue.get(), what)
        if isinstance(item, BaseException):
            raise item
        return item

    async def _wait(self, awaitable, what: str):
        try:
            return await asyncio.wait_for(awaitable, self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no answer from {self.address} within {self.timeout_s:g} s to the "
                               f"{what}{no_socket_hint(self.address)}") from None

    async def _send(self, frame: dict, what: str) -> None:
        data = orjson.dumps(frame)
        if len(data) > terms.MAX_FRAME_BYTES:
            raise ValueError(f"the {what} is {len(data) / 2**20:.1f} MiB, over the {terms.MAX_FRAME_BYTES // 2**20} MiB "
                             f"a server takes by default (--max-frame-bytes): split it into smaller ones")
        try:
            await asyncio.wait_for(self._socket.send(data), self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"could not send the {what} to {self.address} within {self.timeout_s:g} s: "
                               f"{HIGH_WATER_MARK} frames wait unsent{no_socket_hint(self.address)}") from None

    async def _send_quietly(self, frame: dict) -> None:
        """Best effort (a request given up on is cancelled): a closed or stuck socket is let be."""
        if self._is_closed:
            return
        try:
            await asyncio.wait_for(self._socket.send(orjson.dumps(frame)), 1.0)
        except (zmq.ZMQError, TimeoutError) as error:
            log.debug("could not send %s to %s: %s", frame["type"], self.address, error)


class Client:
    """AsyncClient's calls, blocking. Its event loop runs on a thread of its own, so one protocol
    implementation serves both and a Client works inside or outside asyncio code.
    `stream` and `run_job` return plain iterators with the same `.response` / `.summary` / `.id`."""

    def __init__(self, address: str | None = None, server_key: str | bytes | None = None,
                 timeout_s: float = 600.0, max_retries: int = 8):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="seesaw-client", daemon=True)
        self._thread.start()
        try:
            self._client: AsyncClient = self._call(_new_async_client(address, server_key, timeout_s, max_retries))
        except BaseException:
            self._stop_loop()
            raise
        self.address, self.timeout_s = self._client.address, timeout_s

    @property
    def last_result(self) -> dict | None:
        return self._client.last_result

    @property
    def last_job_summary(self) -> dict | None:
        return self._client.last_job_summary

    def complete(self, body: dict, endpoint: str = "completions", stream: bool = False) -> dict:
        return self._call(self._client.complete(body, endpoint, stream))

    def stream(self, body: dict, endpoint: str = "chat") -> _Blocking:
        return _Blocking(self._client.stream(body, endpoint), self._call)

    def submit_many(self, requests: list[tuple[str, dict]], window: int = 64) -> list[dict | ServerError]:
        return self._call(self._client.submit_many(requests, window))

    def run_job(self, path: Path | None = None, lines: list[str] | None = None, max_pending: int | None = None) -> _Blocking:
        return _Blocking(self._client.run_job(path, lines, max_pending), self._call)

    def job_status(self, job_id: str) -> dict:
        return self._call(self._client.job_status(job_id))

    def cancel(self, id: str | None = None, job_id: str | None = None) -> int:
        return self._call(self._client.cancel(id, job_id))

    def stats(self) -> dict:
        return self._call(self._client.stats())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(_shut_down(self._loop, self._client))
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coroutine):
        """Run `coroutine` on the client's loop and wait for it: each wait inside has its own timeout.
        If this wait is interrupted (Ctrl-C), the coroutine is cancelled too."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        finally:
            future.cancel()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


class _Blocking:
    """A TokenStream or JobRun iterated from the caller's thread; its attributes read through."""

    def __init__(self, inner: TokenStream | JobRun, call: Callable):
        self._inner, self._call = inner, call

    def __iter__(self) -> _Blocking:
        return self

    def __next__(self):
        try:
            return self._call(self._inner.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def close(self) -> None:
        self._call(self._inner.aclose())

    def __enter__(self) -> _Blocking:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


async def _new_async_client(*args) -> AsyncClient:
    return AsyncClient(*args)  # made on its loop's thread, where its socket will be used


async def _shut_down(loop: asyncio.AbstractEventLoop, client: AsyncClient) -> None:
    # A call cancelled by Ctrl-C may still be unwinding inside a stream: let it finish first, or
    # closing that stream's generator would find it running.
    unwinding = [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and task.cancelling()]
    if unwinding:
        await asyncio.wait(unwinding, timeout=client.timeout_s)
    await loop.shutdown_asyncgens()  # streams left unfinished send their cancels first
    await client.close()


def _submit(request_id: str, endpoint: str, body: dict, stream: bool) -> dict:
    if endpoint not in terms.ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(terms.ENDPOINTS)}, got {endpoint!r}")
    return _frame("submit", id=request_id, endpoint=endpoint, body=body, stream=stream)


def _frame(kind: str, **fields) -> dict:
    return {"v": terms.VERSION, "type": kind, **fields}


def _server_public(server_key: str | bytes | None, address: str) -> bytes | None:
    """The server's public key when the address needs one (or one is given anyway)."""
    if address.partition("://")[0] not in ("ipc", "tcp", "inproc"):
        raise ValueError(f"{address!r} is not a daemon address: use ipc://PATH or tcp://HOST:PORT")
    if server_key is None:
        if not is_loopback(address):
            raise ValueError(f"{address} is not a loopback address, where the server needs CURVE keys: "
                             f"pass its public key (server_key, --server-key DIR/server.key)")
        return None
    return read_public(server_key.decode() if isinstance(server_key, bytes) else server_key)


def _dealer(context: zmq.asyncio.Context, address: str, server_public: bytes | None) -> zmq.asyncio.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    if server_public is not None:
        secure_client(socket, server_public)
    try:
        socket.connect(address)
    except zmq.ZMQError as error:
        context.destroy(linger=0)
        raise ValueError(f"cannot connect to {address!r}: {error}") from None
    return socket


def _decode(frames: list[bytes]) -> dict | None:
    """The message of a reply (after an optional empty delimiter frame), or None if unreadable."""
    try:
        frame = orjson.loads(frames[-1])
    except orjson.JSONDecodeError:
        frame = None
    if not (isinstance(frame, dict) and isinstance(frame.get("type"), str)
            and all(isinstance(frame.get(key), (str, type(None))) for key in ("id", "job_id"))):
        log.warning("dropped a reply that is not a protocol frame: %.200r", frames[-1])
        return None
    return frame
