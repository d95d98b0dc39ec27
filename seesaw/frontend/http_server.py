"""The daemon's HTTP front door: the OpenAI API (models, chat and completions with streaming,
files and batches), health, Prometheus metrics, the stats as JSON and a page to watch them, on
aiohttp in the engine's own event loop. Requests reach the engine through one LocalClient; each
batch runs the batch front door (`seesaw.frontend.batch_service`). What the server holds is
bounded: body and upload sizes (413), streams, requests and batches at once (429 with a
Retry-After), and the time a body takes to arrive (408)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import time
from collections import deque

import orjson
from aiohttp import web

from seesaw.config import ServeConfig
from seesaw.engine import Engine, EngineError
from seesaw.frontend import http_jobs
from seesaw.frontend.batch_io import SamplingDefaults, response_body
from seesaw.frontend.batch_service import BatchService
from seesaw.frontend.daemon_stats import DaemonStats, StatsBook
from seesaw.frontend.front_door import FrontDoor
from seesaw.frontend.local import LocalClient, Submission
from seesaw.frontend.openai_http import ApiError, StreamChunks, error_body, parse_request, result_error, sse
from seesaw.frontend.prometheus import metrics_text
from seesaw.messages import ErrorCode, RequestKind
from seesaw.protocol_terms import SHUTTING_DOWN
from seesaw.stats import to_json
from seesaw.step import FinishReason

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/health")  # answered without a key: the page holds no data, and probes carry none
HISTORY_SAMPLES = 600  # the stats kept for the page: ten minutes at one a second


def json_response(body, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


class HttpServer(FrontDoor):
    """Start with `await server.start()` once the engine is ready; `drain()` then `close()` to stop."""

    name = "the HTTP server"

    def __init__(self, engine: Engine, config: ServeConfig, defaults: SamplingDefaults, model_name: str):
        super().__init__()
        self.engine, self.config, self.http = engine, config, config.http
        self.defaults, self.model_name = defaults, model_name
        self.book = StatsBook(time.monotonic())
        self.latest_stats: DaemonStats | None = None
        self.history: deque[dict] = deque(maxlen=HISTORY_SAMPLES)  # per stats refresh, for the page
        self.is_draining = False
        self.client = LocalClient(engine, "http")
        self.jobs = BatchService(engine, defaults, model_name, self.http, self._on_batch_ended)
        self._open: set[Submission] = set()  # requests in the engine for a connection
        self._num_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._abandoned: str | None = None  # why the requests still open were stopped
        self._runner: web.AppRunner | None = None
        self._refresh: asyncio.Task | None = None
        self._is_client_open = False
        self.port: int | None = None  # the bound port (useful when asked for port 0)

    # ------------------------------------------------------------ start and stop

    async def start(self) -> None:
        await self.client.__aenter__()
        self._is_client_open = True
        app = web.Application(client_max_size=self.http.max_body_bytes,
                              middlewares=[self._errors, self._authorize])
        app.add_routes([
            web.get("/", self._page), web.get("/health", self._health), web.get("/metrics", self._metrics),
            web.get("/stats", self._stats), web.get("/v1/models", self._models),
            web.get("/v1/models/{model}", self._model),
            web.post("/v1/chat/completions", self._chat), web.post("/v1/completions", self._completions),
        ])
        http_jobs.add_routes(app, self)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     keepalive_timeout=75, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.http.host, self.http.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.jobs.resume()
        self._refresh = self.watch(asyncio.get_running_loop().create_task(self.refresh_stats(1.0), name="http-stats"))

    async def drain(self, timeout_s: float, reason: str | None = None, code: str = SHUTTING_DOWN) -> int:
        """Take nothing new and stop the batches where they are (they resume at the next start);
        wait up to `timeout_s` for the requests in flight, then fail the rest. How many failed."""
        self.is_draining = True
        await self.jobs.stop(timeout_s=self.config.job_stop_timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return await self.abandon(reason or f"the server stopped before this finished "
                                             f"(--drain-timeout {timeout_s:.0f} s)", code)

    async def abandon(self, reason: str, code: str = SHUTTING_DOWN) -> int:
        """Stop every request in flight; each is answered with `reason`. How many there were."""
        self._abandoned = reason
        leftovers = list(self._open)
        for submission in leftovers:
            self.client.cancel(submission)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 2.0)  # their answers go out
        await self.jobs.stop(timeout_s=self.config.job_stop_timeout_s)
        return len(leftovers)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.jobs.stop(timeout_s=self.config.job_stop_timeout_s)
        self.jobs.release()
        if self._is_client_open:
            await self.client.__aexit__(None, None, None)

    # ------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every error in OpenAI's shape, with a Retry-After where trying again helps."""
        try:
            return await handler(request)
        except ApiError as error:
            headers = {} if error.retry_after_s is None else {"Retry-After": str(max(1, round(error.retry_after_s)))}
            if error.status == 429:
                self.book.counts["busy"] += 1
            elif error.status < 500:
                self.book.counts["rejected"] += 1
            return json_response(error.body, error.status, headers)
        except web.HTTPException as error:  # aiohttp's own: no route, wrong method, body too large
            if error.status < 400:
                raise
            self.book.counts["rejected"] += 1
            message = error.text if error.status != 413 else (
                f"the body is larger than {self.http.max_body_bytes} bytes (--max-body-bytes)")
            headers = {name: value for name, value in error.headers.items() if name.lower() == "allow"}
            return json_response(error_body(error.status, message), error.status, headers)
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away
        except Exception as error:  # one request's failure is its own 500, never the server's end
            log.exception("%s %s failed", request.method, request.path)
            return json_response(error_body(500, f"the request failed: {error!r}", str(ErrorCode.SERVER_ERROR)), 500)

    @web.middleware
    async def _authorize(self, request: web.Request, handler):
        if self.http.api_keys and request.path not in OPEN_PATHS:
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), known.encode())
                                                     for known in self.http.api_keys):
                raise ApiError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        return await handler(request)

    def check_open(self) -> None:
        """Refuse new work while draining or once the engine has failed."""
        if self.is_draining:
            raise ApiError(503, "the server is shutting down and takes nothing new", code=SHUTTING_DOWN,
                           retry_after_s=self.config.retry_after_s)
        if self.engine.failure is not None:
            raise ApiError(500, self.engine.failure, code=str(ErrorCode.ENGINE_FAILED))

    async def read_body(self, request: web.Request) -> bytes:
        """The whole request body, within --max-body-bytes and the read timeout."""
        try:
            return await asyncio.wait_for(request.read(), self.http.read_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.http.read_timeout_s:.0f} s") from None

    # ------------------------------------------------------------ chat and completions

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, RequestKind.CHAT)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, RequestKind.COMPLETION)

    async def _generate(self, request: web.Request, kind: RequestKind) -> web.StreamResponse:
        self.check_open()
        call = parse_request(await self.read_body(request), kind, self.defaults)
        if call.stream and self._num_streams >= self.http.max_streams:
            raise ApiError(429, f"the server streams {self.http.max_streams} answers already (--max-streams)",
                           code="busy", retry_after_s=self.config.retry_after_s)
        if len(self._open) >= self.config.max_queued:
            raise ApiError(429, f"the server holds {self.config.max_queued} requests already (--max-queued)",
                           code="busy", retry_after_s=self.config.retry_after_s)
        item = call.item
        try:
            submission = self.client.open_request(item.sampling, item.n, prompt=item.prompt, messages=item.messages,
                                                  prompt_token_ids=item.prompt_token_ids, tools=item.tools,
                                                  tool_choice=item.tool_choice.mode, stream=call.stream)
        except EngineError as error:
            raise ApiError(500, str(error), code=str(ErrorCode.ENGINE_FAILED)) from None
        model = item.model or self.model_name
        self._open.add(submission)
        self._idle.clear()
        try:
            if call.stream:
                self._num_streams += 1
                return await self._stream(request, submission, StreamChunks(item, model, call.include_usage))
            answer = await submission.future
            self._count(answer)
            self._check_abandoned()
            if answer[0].error is not None:
                raise result_error(answer[0])
            return json_response(response_body(item, answer, model))
        except EngineError as error:
            raise ApiError(500, str(error), code=str(ErrorCode.ENGINE_FAILED)) from None
        except (asyncio.CancelledError, ConnectionError):
            self.client.cancel(submission)  # the client went away: stop its request
            self.book.counts["cancelled"] += 1
            raise
        finally:
            self._num_streams -= call.stream
            self._open.discard(submission)
            if not self._open:
                self._idle.set()

    async def _stream(self, request: web.Request, submission: Submission, chunks: StreamChunks) -> web.StreamResponse:
        texts = aiter(submission)
        first = await anext(texts, None)  # a request refused before its first token gets its own status
        if first is None and submission.future.done() and submission.future.exception() is None:
            answer = submission.future.result()
            if answer[0].error is not None:
                self._count(answer)
                raise result_error(answer[0])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        start = chunks.start(len(submission.choices.request_ids))
        if start is not None:
            await response.write(sse(start))
        if first is not None and chunks.streams_text:
            await response.write(sse(chunks.text(*first)))
        async for index, text in texts:
            if text and chunks.streams_text:
                await response.write(sse(chunks.text(index, text)))
        try:
            answer = await submission.future
        except EngineError as error:
            answer = None
            await response.write(sse(error_body(500, str(error), str(ErrorCode.ENGINE_FAILED))))
        if answer is not None:
            self._count(answer)
            if self._abandoned is not None:
                await response.write(sse(error_body(503, self._abandoned, SHUTTING_DOWN)))
            elif answer[0].error is not None:
                await response.write(sse(result_error(answer[0]).body))
            else:
                for chunk in chunks.finish(answer):
                    await response.write(sse(chunk))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response

    def _count(self, answer) -> None:
        if answer[0].error is not None:
            self.book.counts["failed"] += 1
        elif any(result.finish_reason == FinishReason.CANCELLED for result in answer):
            self.book.counts["cancelled"] += 1
        else:
            self.book.counts["done"] += 1

    def _check_abandoned(self) -> None:
        if self._abandoned is not None:
            raise ApiError(503, self._abandoned, code=SHUTTING_DOWN)

    # ------------------------------------------------------------ models, health, stats, the page

    async def _models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name:
            raise ApiError(404, f"no model {request.match_info['model']!r}; this server runs {self.model_name!r}",
                           code="model_not_found", param="model")
        return json_response(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": int(self.engine_started_s), "owned_by": "seesaw"}

    @property
    def engine_started_s(self) -> float:
        return time.time() - (time.monotonic() - self.book.started_s)

    async def _health(self, request: web.Request) -> web.Response:
        if self.engine.failure is not None:
            return json_response({"status": "failed", "reason": self.engine.failure}, 503)
        if self.is_draining:
            return json_response({"status": "draining"}, 503)
        return json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics_text(self.latest_stats), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _stats(self, request: web.Request) -> web.Response:
        """The stats as JSON (the ZeroMQ `stats` frame's form) with the recent history the page draws."""
        if self.latest_stats is None:
            raise ApiError(503, "no stats yet", retry_after_s=1.0)
        return json_response({**to_json(self.latest_stats), "model": self.model_name, "history": list(self.history)})

    async def _page(self, request: web.Request) -> web.Response:
        page = importlib.resources.files("seesaw.frontend").joinpath("page.html").read_bytes()
        return web.Response(body=page, content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                                "script-src 'unsafe-inline'"})

    async def refresh_stats(self, interval_s: float) -> None:
        """Keep `latest_stats` and the page's history fresh."""
        while True:
            try:
                engine_stats = await self.client.stats(timeout_s=max(interval_s, 5.0))
            except (TimeoutError, EngineError):
                await asyncio.sleep(interval_s)
                continue
            stats = self.book.join(engine_stats, time.monotonic(), queued=len(self._open),
                                   jobs_running=self.jobs.num_running, running_jobs_counts=self.jobs.running_counts())
            self.latest_stats = stats
            self.history.append({"uptime_s": round(stats.uptime_s, 1), "tokens_per_s": round(stats.tokens_per_s, 1),
                                 "phases": stats.phases, "transitions": stats.transitions,
                                 "generated": stats.tokens.generated})
            await asyncio.sleep(interval_s)

    def _on_batch_ended(self, counts: dict[str, int]) -> None:
        for name, count in counts.items():
            self.book.counts[name] += count
