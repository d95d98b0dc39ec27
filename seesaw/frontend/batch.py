"""The batch front door: streams an input file into the engine and writes each result as it
finishes. A custom_id already in the output (a resumed run) is skipped, a repeated one gets its
own 400 line, and an interrupted run stops reading, lets the requests in flight finish within a
grace period, and leaves the output whole."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple

from seesaw.engine import Engine, EngineError
from seesaw.engine_client import EngineClient
from seesaw.frontend.batch_io import (
    DUPLICATE_CODE,
    BatchItem,
    LineError,
    SamplingDefaults,
    error_line,
    parse_line,
    result_line,
)
from seesaw.frontend.choices import Choices, choice_samplings
from seesaw.frontend.output import KeySet, ResultSink, id_key
from seesaw.frontend.prefix_order import PrefixOrder, prompt_key
from seesaw.frontend.progress import BatchSummary, Progress, Snapshot
from seesaw.messages import ErrorCode, RequestFinished, RequestKind, StatsReport
from seesaw.step import FinishReason

log = logging.getLogger(__name__)


class _Line(NamedTuple):
    """A line in the engine: its item and its choices' requests."""

    item: BatchItem
    choices: Choices


class BatchRunner:
    """Keeps up to `max_pending` requests in the engine, reading more input as results come back
    (a line asking for n choices is n requests, submitted together; its output line waits for all
    of them). Up to `window` runnable lines more are read ahead and submitted in the order
    `PrefixOrder` picks, lines sharing a prompt prefix together (`window` 1: the input's order).
    `sink` takes each output line (`write(line, is_error)`); `name` names the runner's reply inbox."""

    def __init__(self, engine: Engine, defaults: SamplingDefaults, model_name: str, max_pending: int,
                 sink: ResultSink, finished: KeySet | None = None, progress: Progress | None = None,
                 name: str = "batch", window: int = 1, kind: RequestKind | None = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.engine = engine
        self.defaults = defaults
        self.model_name = model_name
        self.max_pending = max_pending
        self.sink = sink
        self.finished = finished if finished is not None else KeySet()  # keys of custom_ids already answered
        self.progress = progress
        self.name = name
        self.kind = kind  # every line's endpoint, where the job names one (an OpenAI batch's)
        self.summary = BatchSummary()
        self.pending: dict[str, _Line] = {}  # by request id: every choice of a line in the engine
        self._order: PrefixOrder[BatchItem] = PrefixOrder(window)  # lines read, not yet submitted
        self._num_open_lines = 0  # lines submitted and not yet answered
        self._seen = KeySet()  # keys of custom_ids submitted in this run
        self._num_lines = 0  # lines read that hold something (requests, bad lines, skipped ones)
        self._fraction = 0.0  # of the input file read so far
        self._is_stopping = False  # interrupted: read nothing more
        self._deadline: float | None = None  # interrupted: give up on what is in flight after this
        self._client: EngineClient | None = None  # while a run is on
        # (tokens generated, requests running, requests waiting, prefix cache hit rate), from the last stats
        self._live: tuple[int, int, int, float | None] = (0, 0, 0, None)
        self._query_ids = itertools.count()
        self._is_asking = False  # a stats query is out

    def interrupt(self, grace_s: float) -> None:
        """Stop reading; requests in flight may finish within `grace_s` (a second call: none)."""
        now = time.monotonic()
        self._deadline = now if self._is_stopping else now + grace_s
        self._is_stopping = True

    @property
    def num_lines(self) -> int:
        """Lines read so far that hold something."""
        return self._num_lines

    @property
    def num_pending_lines(self) -> int:
        """Lines in the engine not yet answered."""
        return self._num_open_lines

    def cancel(self) -> None:
        """Read nothing more and cancel the requests in flight (each is answered as cancelled)."""
        self._is_stopping = True
        if self._client is not None:
            for request_id in self.pending:
                self._client.cancel(request_id)

    async def run(self, input_path: Path) -> BatchSummary:
        """Run every line; raises EngineError if the engine fails (results written so far stay)."""
        with input_path.open("rb") as source:
            return await self.run_source(source, max(input_path.stat().st_size, 1))

    async def run_source(self, source: BinaryIO, size: int) -> BatchSummary:
        """Run every line of an open binary file of `size` bytes (see `run`)."""
        self.summary = BatchSummary()
        self._client = client = EngineClient(self.engine, self.name).open()
        try:
            lines = enumerate(source, start=1)
            is_read = False
            while (not self._is_stopping and (not is_read or self._order)) or self.pending:
                is_read = self._feed(lines, is_read)
                self._fraction = source.tell() / size
                if not self.pending and self.sink.is_backlogged:
                    await asyncio.sleep(0.05)  # the reader of the output lags: read on once it catches up
                    continue
                if self.pending and not await self._collect():
                    break
                self._ask_progress()
        finally:
            self._client = None
            client.close()
        self.summary.num_abandoned = self._num_open_lines + len(self._order)  # read, then given up on
        self.summary.finish()
        self._report(force=True)
        if self.progress is not None:
            self.progress.finish()
        return self.summary

    def _feed(self, lines, is_read: bool) -> bool:
        """Read ahead into the window and submit from it while the engine has room; whether the
        input has been read to its end. A line is picked from a full window (or what is left at
        the end), and the window fills up only to one line short while the engine is full."""
        order = self._order
        while not self._is_stopping and not self.sink.is_backlogged:
            has_room = len(self.pending) < self.max_pending
            if not is_read and not order.is_full and (has_room or len(order) < order.window - 1):
                entry = next(lines, None)
                if entry is None:
                    is_read = True
                else:
                    self._read(*entry)
            elif order and has_room:
                self._submit(order.take())
            else:
                break
        return is_read

    def _read(self, line_number: int, raw: bytes) -> None:
        """Take one input line: answered at once if it cannot run (or is skipped), else held in the window."""
        if not raw.strip():
            return  # blank lines carry no request
        self._num_lines += 1
        try:
            item, custom_id, problem = parse_line(raw, line_number, self.defaults), None, None
            custom_id = item.custom_id
        except LineError as error:
            item, custom_id, problem = None, error.custom_id, error.message
        key = id_key(custom_id)
        if key in self.finished:
            self.summary.num_skipped += 1
            return
        if key in self._seen:
            self._write_error(custom_id, line_number, f"custom_id {custom_id!r} appears on an earlier line; "
                                                      f"each request needs its own", code=DUPLICATE_CODE)
            return
        self._seen.add(key)
        if item is not None and self.kind is not None and item.kind != self.kind:
            item, problem = None, f"the line asks for {item.kind} but this batch's endpoint takes {self.kind} requests"
        if item is None:
            self._write_error(custom_id, line_number, problem)
            return
        self._order.add(prompt_key(item), item)

    def _submit(self, item: BatchItem) -> None:
        request_ids = [self._client.submit(item.kind, sampling, prompt=item.prompt, messages=item.messages,
                                           prompt_token_ids=item.prompt_token_ids, tools=item.tools,
                                           tool_choice=item.tool_choice.mode)
                       for sampling in choice_samplings(item.sampling, item.n)]
        line = _Line(item, Choices(request_ids))
        for request_id in request_ids:
            self.pending[request_id] = line
        self._num_open_lines += 1

    async def _collect(self) -> bool:
        """Take at least one result; False when an interrupted run's grace period is over.
        Raises EngineError when the engine fails."""
        while True:
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                return False
            timeout_s = 1.0 if self._deadline is None else min(1.0, self._deadline - now)
            message = await self._client.receive(timeout_s)  # a busy engine's answers are taken without a wait
            if message is None:
                self._ask_progress()
                continue
            if self._take(message):
                return True

    def _take(self, message: RequestFinished | StatsReport) -> bool:
        """Handle one reply; whether it was a result."""
        if isinstance(message, StatsReport):
            self._on_stats(message)
            return False
        self._finish(message)
        return True

    def _finish(self, message: RequestFinished) -> None:
        line = self.pending.pop(message.request_id, None)
        if line is None:
            log.warning("result for unknown request %s", message.request_id)
            return
        if message.code == ErrorCode.ENGINE_FAILED:
            raise EngineError(message.error)
        if not line.choices.take(message):
            return  # more choices to come, or the line was answered already (a choice failed)
        self._num_open_lines -= 1
        item, failure = line.item, line.choices.failure
        if failure is not None:
            for request_id in line.choices.unfinished_ids:
                self._client.cancel(request_id)  # their answers come back and are let go
            self._write_error(item.custom_id, item.line_number, failure.error, failure.status_code,
                              failure.prompt_tokens)
            return
        results = line.choices.answer
        self.sink.write(result_line(item, results, item.model or self.model_name))
        self.summary.record(ok=True, prompt_tokens=results[0].prompt_tokens,
                            output_tokens=sum(result.completion_tokens for result in results))
        if any(result.finish_reason == FinishReason.CANCELLED for result in results):
            self.summary.num_cancelled += 1

    def _write_error(self, custom_id: str, line_number: int, message: str, status_code: int = 400,
                     prompt_tokens: int = 0, code: str | None = None) -> None:
        self.sink.write(error_line(custom_id, line_number, message, status_code, code), is_error=True)
        self.summary.record(ok=False, prompt_tokens=prompt_tokens)

    def _ask_progress(self) -> None:
        """Ask the scheduler for live counts when a progress line is due; the answer shows it."""
        if self.progress is None or self._is_asking or not self.progress.is_due():
            return
        self._is_asking = True
        self._client.ask_stats(next(self._query_ids))

    def _on_stats(self, message: StatsReport) -> None:
        self._is_asking = False
        stats = message.stats
        self._live = (stats.totals.generated_tokens, stats.requests.running, stats.requests.waiting,
                      stats.totals.cache_hit_rate)
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        if self.progress is None or not (force or self.progress.is_due()):
            return
        generated, running, waiting, cache_hit_rate = self._live
        self.progress.update(Snapshot(
            fraction_read=self._fraction, num_lines=self._num_lines,
            num_done=self.summary.num_done + self.summary.num_skipped, num_failed=self.summary.num_failed,
            num_running=running,
            num_waiting=waiting, generated_tokens=generated, elapsed_s=time.perf_counter() - self.summary.started,
            cache_hit_rate=cache_hit_rate,
        ), force=force)
