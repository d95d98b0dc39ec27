"""The batch front door: streams an input file into the engine and writes each result as it finishes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import orjson

from seesaw.engine import Engine, EngineError
from seesaw.frontend.batch_io import BatchItem, LineError, SamplingDefaults, error_line, parse_line, result_line
from seesaw.frontend.progress import BatchSummary, Progress
from seesaw.messages import RequestFinished, Submit
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


class BatchRunner:
    """Keeps up to `max_pending` requests in the engine, reading more input as results come back."""

    def __init__(self, engine: Engine, defaults: SamplingDefaults, model_name: str, max_pending: int,
                 progress: Progress | None = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.engine = engine
        self.defaults = defaults
        self.model_name = model_name
        self.max_pending = max_pending
        self.progress = progress
        self.summary = BatchSummary()
        self.pending: dict[str, BatchItem] = {}
        self._fraction = 0.0  # of the input file read so far

    async def run(self, input_path: Path, output: BinaryIO) -> BatchSummary:
        """Run every line; raises EngineError if the engine fails (results written so far stay)."""
        self.summary = BatchSummary()
        replies = Inbox(self.engine.context, self.engine.reply_address("batch"))
        queue = Outbox(self.engine.context, self.engine.request_queue_address)
        size = max(input_path.stat().st_size, 1)
        try:
            with input_path.open("rb") as source:
                lines = enumerate(source, start=1)
                is_read = False
                while not is_read or self.pending:
                    while not is_read and len(self.pending) < self.max_pending:
                        entry = next(lines, None)
                        if entry is None:
                            is_read = True
                            break
                        self._submit(*entry, queue, replies.addresses[0], output)
                    if self.pending:
                        await self._collect(replies, output)
                    self._report(source.tell() / size)
        finally:
            queue.close(linger_s=0)
            replies.close()
        self._report(1.0, force=True)
        if self.progress is not None:
            self.progress.finish()
        return self.summary

    def _submit(self, line_number: int, raw: bytes, queue: Outbox, reply_to: str, output: BinaryIO) -> None:
        if not raw.strip():
            return  # blank lines carry no request
        try:
            item = parse_line(raw, line_number, self.defaults)
        except LineError as error:
            self._write(output, error_line(error.custom_id, line_number, error.message))
            self.summary.record(ok=False)
            return
        request_id = f"line-{line_number}"
        self.pending[request_id] = item
        queue.send(Submit(
            request_id=request_id, reply_to=reply_to, kind=item.kind, sampling=item.sampling,
            prompt=item.prompt, messages=item.messages, prompt_token_ids=item.prompt_token_ids,
        ))

    async def _collect(self, replies: Inbox, output: BinaryIO) -> None:
        """Write at least one finished result, waiting at most a second at a time for the engine."""
        while True:
            if self.engine.failure is not None:
                raise EngineError(self.engine.failure)
            try:
                message = await replies.recv(timeout_s=1.0)
            except TimeoutError:
                self._report(None)
                continue
            self._finish(message, output)
            return

    def _finish(self, message: RequestFinished, output: BinaryIO) -> None:
        item = self.pending.pop(message.request_id, None)
        if item is None:
            log.warning("result for unknown request %s", message.request_id)
            return
        if message.error is not None:
            if self.engine.failure is not None and message.status_code >= 500:
                raise EngineError(self.engine.failure)
            self._write(output, error_line(item.custom_id, item.line_number, message.error, message.status_code))
            self.summary.record(ok=False, prompt_tokens=message.prompt_tokens)
            return
        self._write(output, result_line(item, message.text, message.finish_reason, message.prompt_tokens,
                                        message.completion_tokens, item.model or self.model_name))
        self.summary.record(ok=True, prompt_tokens=message.prompt_tokens, output_tokens=message.completion_tokens)

    @staticmethod
    def _write(output: BinaryIO, line: dict) -> None:
        output.write(orjson.dumps(line) + b"\n")
        output.flush()

    def _report(self, fraction: float | None, force: bool = False) -> None:
        if self.progress is not None:
            if fraction is not None:
                self._fraction = fraction
            self.progress.update(self.summary, self._fraction, force=force)
