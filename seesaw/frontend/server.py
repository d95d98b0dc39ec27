"""The daemon's front door: one ZeroMQ ROUTER socket where clients submit requests and batch jobs
(docs/protocol.md). Replies go by the client's socket identity. What the server holds is bounded:
requests and jobs by admission ("busy"), frames by size, replies to a slow client by a backlog
beyond which the client counts as gone and its work is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import stat
import time
from collections import deque
from dataclasses import dataclass

import zmq
import zmq.asyncio

from seesaw.config import ServeConfig
from seesaw.engine import Engine
from seesaw.engine_client import EngineClient
from seesaw.frontend.batch_io import BatchItem, SamplingDefaults
from seesaw.frontend.choices import Choices, choice_samplings
from seesaw.frontend.daemon_stats import DaemonStats, StatsBook
from seesaw.frontend.front_door import FrontDoor
from seesaw.frontend.jobs import Job
from seesaw.frontend.protocol import (
    BUSY,
    SHUTTING_DOWN,
    BatchCall,
    CancelCall,
    JobStatusCall,
    ProtocolError,
    StatsCall,
    SubmitCall,
    error_frame,
    frame,
    parse_frames,
    result_frame,
)
from seesaw.messages import ErrorCode, RequestFinished, StatsReport, TextDeltas
from seesaw.stats import EngineStats, to_json
from seesaw.step import FinishReason
from seesaw.transport.curve import secure_server

log = logging.getLogger(__name__)


@dataclass
class _Call:
    """A request in the engine on a client's behalf: one engine request per choice."""

    identity: bytes
    label: str  # the client's id
    model: str
    started_s: float
    choices: Choices
    item: BatchItem
    is_gone: bool = False  # its client left: the result is dropped


class Server(FrontDoor):
    """Start with `await server.start()` once the engine is ready; `drain()` then `close()` to stop."""

    def __init__(self, engine: Engine, config: ServeConfig, defaults: SamplingDefaults, model_name: str):
        super().__init__()
        self.engine = engine
        self.config = config
        self.defaults = defaults  # for what a request body leaves out
        self.model_name = model_name
        self.book = StatsBook(time.monotonic())
        self.is_draining = False
        self.counts = self.book.counts
        self.latest_stats: DaemonStats | None = None  # the last stats built, for the Prometheus endpoint
        self._calls: dict[str, _Call] = {}  # by the engine's request id (each choice's)
        self._request_ids: dict[tuple[bytes, str], set[str]] = {}  # (identity, the client's id) -> request ids
        self._jobs: dict[str, Job] = {}
        self._backlogs: dict[bytes, deque[bytes]] = {}
        self._stats_waiters: dict[int, list[tuple[bytes, str]]] = {}
        self._next_jobs = itertools.count(1)
        self._query_ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task] = []
        self._router: zmq.asyncio.Socket | None = None
        self._engine_client = EngineClient(engine, "server")
        self._finished_jobs: dict[str, dict] = {}  # the last statuses of jobs that ended, newest last
        self._stalled_since: dict[bytes, float] = {}  # when a client's backlog last failed to shrink

    # ------------------------------------------------------------ start and stop

    async def start(self) -> None:
        config, context = self.config, self.engine.context
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a client that left raises, so its work stops
        router.setsockopt(zmq.SNDHWM, config.high_water_mark)
        router.setsockopt(zmq.RCVHWM, config.receive_high_water_mark)
        router.setsockopt(zmq.MAXMSGSIZE, config.max_frame_bytes)
        self._router = router
        if config.curve_secret_key is not None:
            secure_server(router, config.curve_secret_key)
        router.bind(config.address)
        self._engine_client.open()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve_clients(), name="server-clients"),
                       loop.create_task(self._serve_engine(), name="server-engine"),
                       loop.create_task(self._flush_backlogs(), name="server-backlogs")]
        for task in self._tasks:
            self.watch(task)

    async def drain(self, timeout_s: float, reason: str | None = None, code: str = SHUTTING_DOWN) -> int:
        """Take nothing new; wait up to `timeout_s` for the requests and jobs in flight, then fail
        the rest with `reason` (by default: the drain timeout). Returns how many were failed."""
        self.is_draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        reason = reason or f"the server stopped before this finished (--drain-timeout {timeout_s:.0f} s)"
        return await self.abandon(reason, code)

    async def abandon(self, reason: str, code: str = SHUTTING_DOWN) -> int:
        """Fail every request and job in flight with `reason`; how many there were."""
        leftovers = list(self._calls.items())
        failed: set[int] = set()  # the calls answered here (by id(): a call's choices share it)
        for request_id, call in leftovers:
            self._engine_client.cancel(request_id)
            if not call.choices.is_decided and id(call) not in failed:
                failed.add(id(call))
                self.send(call.identity, error_frame(call.label, code, reason))
            self._forget(request_id)
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.wait([job.task for job in jobs], timeout=self.config.job_stop_timeout_s)
        for job in jobs:
            if not job.task.done():
                job.task.cancel()
                self.send(job.identity, error_frame(job.label, code, reason))
        await self._flush_once(timeout_s=1.0)  # the last frames go out before the socket closes
        return len(failed) + len(jobs)

    async def close(self) -> None:
        """Stop serving; replies already queued get a moment to go out."""
        jobs = [job.task for job in self._jobs.values() if job.task is not None]
        for task in [*self._tasks, *jobs]:
            task.cancel()
        await asyncio.gather(*self._tasks, *jobs, return_exceptions=True)
        self._engine_client.close()
        if self._router is not None:
            self._router.close(linger=1000)

    # ------------------------------------------------------------ from clients

    async def _serve_clients(self) -> None:
        while True:
            identity, *frames = await self._router.recv_multipart()
            try:
                call = parse_frames(frames, self.defaults)
            except ProtocolError as error:
                self.counts["rejected"] += 1
                self.send(identity, error_frame(error.label, error.code, error.message))
                continue
            try:
                self._on_call(identity, call)
            except Exception as error:  # one client's call never ends the server
                log.exception("a call from a client failed")
                with contextlib.suppress(zmq.ZMQError):
                    self.send(identity, error_frame(call.label, ErrorCode.SERVER_ERROR, f"the call failed: {error!r}"))

    def _on_call(self, identity: bytes, call) -> None:
        match call:
            case SubmitCall():
                self._on_submit(identity, call)
            case BatchCall():
                self._on_batch(identity, call)
            case CancelCall():
                self._on_cancel(identity, call)
            case JobStatusCall():
                job = self._jobs.get(call.job_id)
                status = job.status() if job is not None and job.identity == identity else None
                finished = self._finished_jobs.get(call.job_id)
                if status is None and finished is not None and finished["identity"] == identity:
                    status = finished["status"]
                if status is None:
                    self.send(identity, error_frame(call.label, ErrorCode.INVALID_REQUEST, f"no job {call.job_id!r}"))
                else:
                    self.send(identity, frame("job_status", id=call.label, **status))
            case StatsCall():
                self._ask_stats(identity, call.label)

    def _refusal(self, label: str, jobs: bool = False) -> bytes | None:
        """The error frame of a call the server cannot take now (None: it can)."""
        if self.is_draining:
            return error_frame(label, SHUTTING_DOWN, "the server is shutting down and takes nothing new")
        if self.engine.failure is not None:
            return error_frame(label, ErrorCode.ENGINE_FAILED, self.engine.failure)
        full = len(self._jobs) >= self.config.max_jobs if jobs else len(self._calls) >= self.config.max_queued
        if full:
            self.counts["busy"] += 1
            what = f"{self.config.max_jobs} batch jobs" if jobs else f"{self.config.max_queued} requests"
            return error_frame(label, BUSY, f"the server holds {what} already", self.config.retry_after_s)
        return None

    def _on_submit(self, identity: bytes, call: SubmitCall) -> None:
        refusal = self._refusal(call.label)
        if refusal is not None:
            self.send(identity, refusal)
            return
        item = call.item
        request_ids = [self._engine_client.submit(item.kind, sampling, prompt=item.prompt, messages=item.messages,
                                                  prompt_token_ids=item.prompt_token_ids, stream=call.stream,
                                                  tools=item.tools, tool_choice=item.tool_choice.mode)
                       for sampling in choice_samplings(item.sampling, item.n)]
        entry = _Call(identity, call.label, item.model or self.model_name, time.monotonic(), Choices(request_ids), item)
        for request_id in request_ids:
            self._calls[request_id] = entry
        self._request_ids.setdefault((identity, call.label), set()).update(request_ids)
        self._idle.clear()

    def _on_batch(self, identity: bytes, call: BatchCall) -> None:
        refusal = self._refusal(call.label, jobs=True)
        if refusal is not None:
            self.send(identity, refusal)
            return
        if call.path is not None:
            problem = self._path_problem(call.path)
            if problem is not None:
                self.send(identity, error_frame(call.label, ErrorCode.INVALID_REQUEST, problem))
                return
            source = open(call.path, "rb")  # noqa: SIM115 (the job closes it)
        else:
            source = io.BytesIO("\n".join(call.lines).encode())
        job_id = f"job-{next(self._next_jobs)}"
        max_pending = min(call.max_pending or self.config.max_job_pending, self.config.max_job_pending)
        job = Job(self, job_id, identity, call.label, source, max_pending)
        self._jobs[job_id] = job
        self._idle.clear()
        self.send(identity, frame("job", id=call.label, job_id=job_id))
        job.task = asyncio.get_running_loop().create_task(job.run(), name=job_id)

    def _path_problem(self, path: str) -> str | None:
        """Why a batch path cannot be read here (None: it can). Paths are taken only on an ipc
        socket, which only this user can reach: anyone on a tcp port would read the server's files."""
        if not self.config.address.startswith("ipc://"):
            return "a batch path is taken only on an ipc:// socket; send the lines inline"
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return f"{path} is not a regular file"
            with open(path, "rb"):
                return None
        except (OSError, ValueError) as error:
            return f"cannot read {path}: {error}"

    def job_ended(self, job: Job) -> None:
        """Forget a finished job, keeping its last status for a while."""
        self._jobs.pop(job.job_id, None)
        self._finished_jobs[job.job_id] = {"identity": job.identity, "status": job.status()}
        for name, count in job.counts().items():
            self.counts[name] += count  # a job's lines count among the server's requests once it ends
        while len(self._finished_jobs) > self.config.max_jobs * 16:
            self._finished_jobs.pop(next(iter(self._finished_jobs)))
        self._check_idle()

    def _on_cancel(self, identity: bytes, call: CancelCall) -> None:
        jobs = [job for job in self._jobs.values() if job.identity == identity
                and (job.job_id == call.job_id or (call.job_id is None and job.label == call.label))]
        request_ids = sorted(self._request_ids.get((identity, call.label), ())) if call.job_id is None else []
        for request_id in request_ids:
            self._engine_client.cancel(request_id)
        num_requests = len({id(self._calls[request_id]) for request_id in request_ids})  # a call's choices count once
        for job in jobs:
            num_requests += job.runner.num_pending_lines
            job.cancel()
        fields = {"id": call.label} if call.job_id is None else {"id": call.label, "job_id": call.job_id}
        self.send(identity, frame("cancelled", num_requests=num_requests, **fields))

    # ------------------------------------------------------------ from the engine

    async def _serve_engine(self) -> None:
        while True:
            # The engine's failure comes as answers to what is in flight; the daemon's lifecycle stops the server.
            message = await self._engine_client.receive(watch_failure=False)
            match message:
                case RequestFinished():
                    self._on_finished(message)
                case TextDeltas():
                    for delta in message.deltas:
                        call = self._calls.get(delta.request_id)
                        if call is not None and not call.is_gone:
                            index = call.choices.index(delta.request_id)
                            self.send(call.identity, frame("token", id=call.label, index=index, text=delta.text,
                                                            token_ids=delta.token_ids))
                case StatsReport():
                    self._on_stats(message)

    def _on_finished(self, result: RequestFinished) -> None:
        call = self._calls.get(result.request_id)
        if call is None:
            return
        self._forget(result.request_id)
        if not call.choices.take(result):
            return  # more choices to come, or the request was answered already (a choice failed)
        answer = call.choices.answer
        if call.choices.failure is not None:
            self.counts["failed"] += 1
            for request_id in call.choices.unfinished_ids:
                self._engine_client.cancel(request_id)  # their answers come back and are let go
        elif any(choice.finish_reason == FinishReason.CANCELLED for choice in answer):
            self.counts["cancelled"] += 1
        else:
            self.counts["done"] += 1
        if not call.is_gone:
            self.send(call.identity, result_frame(call.label, answer, call.model, call.item))

    def _forget(self, request_id: str) -> None:
        call = self._calls.pop(request_id)
        key = (call.identity, call.label)
        self._request_ids[key].discard(request_id)
        if not self._request_ids[key]:
            del self._request_ids[key]
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._calls and not self._jobs:
            self._idle.set()

    # ------------------------------------------------------------ stats

    def _ask_stats(self, identity: bytes, label: str) -> None:
        query_id = next(self._query_ids)
        self._stats_waiters[query_id] = [(identity, label)]
        self._engine_client.ask_stats(query_id)

    async def refresh_stats(self, interval_s: float) -> None:
        """Keep `latest_stats` fresh (for the Prometheus endpoint)."""
        while True:
            query_id = next(self._query_ids)
            self._stats_waiters[query_id] = []
            self._engine_client.ask_stats(query_id)
            await asyncio.sleep(interval_s)
            self._stats_waiters.pop(query_id, None)  # unanswered (the engine is gone): not kept

    def _on_stats(self, report: StatsReport) -> None:
        waiters = self._stats_waiters.pop(report.query_id, [])
        stats = self.stats(report.stats)
        self.latest_stats = stats
        if waiters:
            form = to_json(stats)
            for identity, label in waiters:
                self.send(identity, frame("stats", id=label, stats=form))

    def stats(self, engine: EngineStats) -> DaemonStats:
        """The stats reply: this server's counts joined with the engine's."""
        return self.book.join(engine, time.monotonic(), queued=len(self._calls), jobs_running=len(self._jobs),
                              running_jobs_counts=[job.counts() for job in self._jobs.values()])

    # ------------------------------------------------------------ to clients

    def send(self, identity: bytes, data: bytes) -> None:
        """Send one frame to a client without waiting: held back while the client lags."""
        backlog = self._backlogs.get(identity)
        if backlog is not None:  # keep a client's frames in order
            self._hold(identity, data)
            return
        error = self._try_send(identity, data)
        if isinstance(error, zmq.Again):
            self._hold(identity, data)
        elif error is not None:
            self._client_gone(identity, "it disconnected")

    def _try_send(self, identity: bytes, data: bytes) -> zmq.ZMQError | None:
        """Send without waiting (through the asyncio socket, which then re-arms its reader, so a
        reply sent here never hides a request arriving meanwhile); the error, if it failed."""
        sent = self._router.send_multipart([identity, data], flags=zmq.NOBLOCK)  # an already finished future
        error = sent.exception()
        if error is not None and not isinstance(error, zmq.ZMQError):
            raise error
        return error

    def _hold(self, identity: bytes, data: bytes) -> None:
        backlog = self._backlogs.setdefault(identity, deque())
        if len(backlog) >= self.config.max_backlog_frames:
            self._client_gone(identity, f"it left {len(backlog)} replies unread")
            return
        backlog.append(data)

    def is_backlogged(self, identity: bytes) -> bool:
        return identity in self._backlogs

    async def _flush_backlogs(self) -> None:
        while True:
            await self._flush_once(timeout_s=None)

    async def _flush_once(self, timeout_s: float | None) -> None:
        """Retry held replies until every backlog is empty (or `timeout_s` passes)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause_s = 0.005
        while self._backlogs and (deadline is None or time.monotonic() < deadline):
            for identity in list(self._backlogs):
                self._flush_client(identity)

            await asyncio.sleep(pause_s)
            pause_s = min(0.1, pause_s * 2)
        if timeout_s is None:
            await asyncio.sleep(0.01)  # nothing held: look again soon

    def _flush_client(self, identity: bytes) -> None:
        """Send what a client's backlog holds, as far as it takes it; a client that has taken
        nothing for `client_stall_s` counts as gone."""
        backlog, sent = self._backlogs.get(identity), 0
        while backlog:
            error = self._try_send(identity, backlog[0])
            if isinstance(error, zmq.Again):
                break
            if error is not None:
                self._client_gone(identity, "it disconnected")
                return
            backlog.popleft()
            sent += 1
        now = time.monotonic()
        if not backlog:
            self._backlogs.pop(identity, None)
            self._stalled_since.pop(identity, None)
        elif sent:
            self._stalled_since[identity] = now
        elif now - self._stalled_since.setdefault(identity, now) > self.config.client_stall_s:
            self._client_gone(identity, f"it read nothing for {self.config.client_stall_s:.0f} s")

    def _client_gone(self, identity: bytes, why: str) -> None:
        """Cancel everything a client that stopped listening has in flight (said once: later
        replies that cannot reach it find nothing left to cancel)."""
        self._backlogs.pop(identity, None)
        self._stalled_since.pop(identity, None)
        request_ids = [request_id for request_id, call in self._calls.items()
                       if call.identity == identity and not call.is_gone]
        jobs = [job for job in self._jobs.values() if job.identity == identity and job.state == "running"]
        if request_ids or jobs:
            log.warning("a client stopped listening (%s); cancelling its %d requests and %d jobs",
                        why, len(request_ids), len(jobs))
        for request_id in request_ids:
            self._calls[request_id].is_gone = True
            self._engine_client.cancel(request_id)
        for job in jobs:
            job.cancel()

