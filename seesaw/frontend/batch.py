"""The batch front door: streams an input file into the engine and writes each result as it
finishes. A custom_id already in the output (a resumed run) is skipped, a repeated one gets its
own 400 line, and an interrupted run stops reading, lets the requests in flight finish within a
grace period, and leaves the output whole."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from seesaw.engine import Engine, EngineError
from seesaw.frontend.batch_io import (
    DUPLICATE_CODE,
    BatchItem,
    LineError,
    SamplingDefaults,
    error_line,
    parse_line,
    result_line,
)
from seesaw.frontend.output import KeySet, ResultSink, id_key
from seesaw.frontend.progress import BatchSummary, Progress, Snapshot
from seesaw.messages import RequestFinished, Submit
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


class BatchRunner:
    """Keeps up to `max_pending` requests in the engine, reading more input as results come back."""

    def __init__(self, engine: Engine, defaults: SamplingDefaults, model_name: str, max_pending: int,
                 sink: ResultSink, finished: KeySet | None = None, progress: Progress | None = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.engine = engine
        self.defaults = defaults
        self.model_name = model_name
        self.max_pending = max_pending
        self.sink = sink
        self.finished = finished if finished is not None else KeySet()  # keys of custom_ids already answered
        self.progress = progress
        self.summary = BatchSummary()
        self.pending: dict[str, BatchItem] = {}
        self._seen = KeySet()  # keys of custom_ids submitted in this run
        self._num_lines = 0  # lines read that hold something (requests, bad lines, skipped ones)
        self._fraction = 0.0  # of the input file read so far
        self._is_stopping = False  # interrupted: read nothing more
        self._deadline: float | None = None  # interrupted: give up on what is in flight after this

    def interrupt(self, grace_s: float) -> None:
        """Stop reading; requests in flight may finish within `grace_s` (a second call: none)."""
        now = time.monotonic()
        self._deadline = now if self._is_stopping else now + grace_s
        self._is_stopping = True

    async def run(self, input_path: Path) -> BatchSummary:
        """Run every line; raises EngineError if the engine fails (results written so far stay)."""
        self.summary = BatchSummary()
        replies = Inbox(self.engine.context, self.engine.reply_address("batch"))
        queue = Outbox(self.engine.context, self.engine.request_queue_address)
        size = max(input_path.stat().st_size, 1)
        try:
            with input_path.open("rb") as source:
                lines = enumerate(source, start=1)
                is_read = False
                while (not is_read and not self._is_stopping) or self.pending:
                    while not is_read and not self._is_stopping and len(self.pending) < self.max_pending:
                        entry = next(lines, None)
                        if entry is None:
                            is_read = True
                            break
                        self._submit(*entry, queue, replies.addresses[0])
                    self._fraction = source.tell() / size
                    if self.pending and not await self._collect(replies):
                        break
                    self._report()
        finally:
            queue.close(linger_s=0)
            replies.close()
        self.summary.num_abandoned = len(self.pending)
        self._report(force=True)
        if self.progress is not None:
            self.progress.finish()
        return self.summary

    def _submit(self, line_number: int, raw: bytes, queue: Outbox, reply_to: str) -> None:
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
        if item is None:
            self._write_error(custom_id, line_number, problem)
            return
        request_id = f"line-{line_number}"
        self.pending[request_id] = item
        queue.send(Submit(
            request_id=request_id, reply_to=reply_to, kind=item.kind, sampling=item.sampling,
            prompt=item.prompt, messages=item.messages, prompt_token_ids=item.prompt_token_ids,
        ))

    async def _collect(self, replies: Inbox) -> bool:
        """Write at least one finished result, waiting at most a second at a time for the engine;
        False when an interrupted run's grace period is over."""
        while True:
            if self.engine.failure is not None:
                raise EngineError(self.engine.failure)
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return False
            try:
                message = await replies.recv(timeout_s=1.0)
            except TimeoutError:
                self._report()
                continue
            self._finish(message)
            return True

    def _finish(self, message: RequestFinished) -> None:
        item = self.pending.pop(message.request_id, None)
        if item is None:
            log.warning("result for unknown request %s", message.request_id)
            return
        if message.error is not None:
            if self.engine.failure is not None and message.status_code >= 500:
                raise EngineError(self.engine.failure)
            self._write_error(item.custom_id, item.line_number, message.error, message.status_code,
                              message.prompt_tokens)
            return
        self.sink.write(result_line(item, message.text, message.finish_reason, message.prompt_tokens,
                                    message.completion_tokens, item.model or self.model_name))
        self.summary.record(ok=True, prompt_tokens=message.prompt_tokens, output_tokens=message.completion_tokens)

    def _write_error(self, custom_id: str, line_number: int, message: str, status_code: int = 400,
                     prompt_tokens: int = 0, code: str | None = None) -> None:
        self.sink.write(error_line(custom_id, line_number, message, status_code, code), is_error=True)
        self.summary.record(ok=False, prompt_tokens=prompt_tokens)

    def _report(self, force: bool = False) -> None:
        if self.progress is None or not (force or self.progress.is_due()):
            return
        generated, running, waiting = self.engine.live()
        self.progress.update(Snapshot(
            fraction_read=self._fraction, num_lines=self._num_lines,
            num_done=self.summary.num_done + self.summary.num_skipped, num_failed=self.summary.num_failed,
            num_running=running,
            num_waiting=waiting, generated_tokens=generated, elapsed_s=time.perf_counter() - self.summary.started,
        ), force=force)
