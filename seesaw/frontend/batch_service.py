"""The HTTP API's batches: each runs the batch front door (`BatchRunner`) over its uploaded input
file and writes its output files as `seesaw-cli batch --errors` does. A server started again
finds its unfinished batches and resumes them from their output files, so every custom_id is
answered once however often the server stopped."""

from __future__ import annotations

import asyncio
import fcntl
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from seesaw.config import HttpConfig
from seesaw.engine import Engine, EngineError
from seesaw.frontend.batch import BatchRunner
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.job_store import INPUT_PURPOSE, OUTPUT_PURPOSE, BatchStore, FileStore
from seesaw.frontend.openai_http import ENDPOINTS, ApiError
from seesaw.frontend.output import KeySet, ResultSink, finished_ids

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = ("24h",)


@dataclass
class _Run:
    """A batch running now: its record as last saved, its runner, and what earlier runs wrote."""

    record: dict
    runner: BatchRunner
    sink: ResultSink
    num_completed_before: int
    num_failed_before: int
    task: asyncio.Task | None = None
    is_cancelled: bool = False
    is_interrupted: bool = False  # the server is stopping: left to resume


class BatchService:
    """Creates, runs, cancels and describes batches; `resume()` once at start, `stop()` at the end."""

    def __init__(self, engine: Engine, defaults: SamplingDefaults, model_name: str, config: HttpConfig,
                 on_ended: Callable[[dict[str, int]], None]):
        self.engine, self.defaults, self.model_name, self.config = engine, defaults, model_name, config
        self._lock = _claim(config.data_dir)
        self.files = FileStore(config.data_dir / "files")
        self.batches = BatchStore(config.data_dir / "batches")
        self.on_ended = on_ended  # takes a finished run's request counts by outcome
        self._runs: dict[str, _Run] = {}

    @property
    def num_running(self) -> int:
        return len(self._runs)

    def running_counts(self) -> list[dict[str, int]]:
        """The request counts (by outcome) of the batches running now."""
        return [run.runner.summary.outcomes() for run in self._runs.values()]

    def resume(self) -> int:
        """Start again every batch a stopped server left unfinished; how many."""
        unfinished = self.batches.unfinished()
        for record in unfinished:
            log.warning("resuming %s from its output files", record["id"])
            self._start(record)
        return len(unfinished)

    def create(self, input_file_id, endpoint, completion_window, metadata) -> dict:
        """A new batch, started at once; ApiError names a bad field or a full server."""
        source = self.files.get(input_file_id) if isinstance(input_file_id, str) else None
        if source is None:
            raise ApiError(400 if not isinstance(input_file_id, str) else 404,
                           f"no file {input_file_id!r}", param="input_file_id")
        if source["purpose"] != INPUT_PURPOSE:
            raise ApiError(400, f"file {input_file_id} has purpose {source['purpose']!r}, not 'batch'",
                           param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise ApiError(400, f"completion_window must be '24h', got {completion_window!r}",
                           param="completion_window")
        _check_metadata(metadata)
        if len(self._runs) >= self.config.max_batches:
            raise ApiError(429, f"the server runs {self.config.max_batches} batches already; try again when one ends",
                           code="busy", retry_after_s=5.0)
        record = self.batches.create(input_file_id, endpoint, completion_window, metadata, source["_lines"])
        return self._start(record).record

    def view(self, batch_id: str) -> dict | None:
        """A batch as it stands, its counts live while it runs."""
        run = self._runs.get(batch_id)
        if run is None:
            return self.batches.get(batch_id)
        return {**run.record, "request_counts": self._counts(run)}

    def cancel(self, batch_id: str) -> dict:
        record = self.batches.get(batch_id)
        if record is None:
            raise ApiError(404, f"no batch {batch_id!r}")
        run = self._runs.get(batch_id)
        if run is None:
            if record["status"] == "cancelled":
                return record
            raise ApiError(409, f"batch {batch_id} is {record['status']} and cannot be cancelled", code="conflict")
        if not run.is_cancelled:
            run.is_cancelled = True
            run.record = self.batches.move(run.record, "cancelling")
            run.runner.cancel()
        return self.view(batch_id)

    def release(self) -> None:
        """Let another server use the data folder (once every run has stopped)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def stop(self, timeout_s: float) -> None:
        """Stop every run where it is, leaving it to resume at the next start."""
        for run in self._runs.values():
            run.is_interrupted = True
            run.runner.interrupt(0.0)
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # ------------------------------------------------------------ one run

    def _start(self, record: dict) -> _Run:
        output, errors = (self.files.data_path(record[name]) for name in ("_output_id", "_error_id"))
        finished = KeySet()
        counts = []
        for path in (output, errors):
            done, count = finished_ids(path)  # also cuts a line a crash tore
            finished.update(done)
            counts.append(count)
        sink = ResultSink(output, errors, append=True)
        pending = self.config.max_batch_pending
        runner = BatchRunner(self.engine, self.defaults, self.model_name, pending, sink, finished,
                             name=record["id"], window=pending, kind=ENDPOINTS[record["endpoint"]])
        if record["status"] in ("validating", "finalizing"):
            record = self.batches.move(record, "in_progress")
        run = _Run(record, runner, sink, *counts, is_cancelled=record["status"] == "cancelling")
        if run.is_cancelled:
            runner.cancel()  # cancelled before the server stopped: finish it without running more
        self._runs[record["id"]] = run
        run.task = asyncio.get_running_loop().create_task(self._run(run), name=record["id"])
        return run

    async def _run(self, run: _Run) -> None:
        batch_id = run.record["id"]
        failure = None
        try:
            await run.runner.run(self.files.data_path(run.record["input_file_id"]))
        except EngineError as error:
            run.is_interrupted = True  # the server stops with the engine; the next one resumes it
            log.error("%s stopped: %s", batch_id, error)
        except (OSError, ValueError) as error:
            failure = str(error)
        except Exception as error:  # one batch's failure is its own, never the server's end
            log.exception("%s failed", batch_id)
            failure = f"the batch failed: {error!r}"
        finally:
            run.sink.close()
            self._runs.pop(batch_id, None)
            self.on_ended(run.runner.summary.outcomes())
        if not run.is_interrupted:
            self._finish(run, failure)

    def _finish(self, run: _Run, failure: str | None) -> None:
        """File the outputs and record how the batch ended."""
        record = self.batches.move(run.record, "finalizing")
        counts = self._counts(run)
        output_id, error_id = record["_output_id"], record["_error_id"]
        self.files.add(output_id, f"{record['id']}_output.jsonl", OUTPUT_PURPOSE, counts["completed"])
        if self.files.data_path(error_id).stat().st_size:
            self.files.add(error_id, f"{record['id']}_error.jsonl", OUTPUT_PURPOSE, counts["failed"])
        else:
            self.files.delete(error_id)
            error_id = None
        status = "failed" if failure is not None else "cancelled" if run.is_cancelled else "completed"
        errors = None if failure is None else {"object": "list", "data": [
            {"code": "batch_failed", "message": failure, "param": None, "line": None}]}
        self.batches.move(record, status, output_file_id=output_id, error_file_id=error_id, request_counts=counts,
                          errors=errors)

    @staticmethod
    def _counts(run: _Run) -> dict[str, int]:
        """OpenAI's counts: a line a cancel stopped early is in the output file but not completed."""
        outcomes = run.runner.summary.outcomes()
        return {"total": run.record["request_counts"]["total"],
                "completed": run.num_completed_before + outcomes["done"],
                "failed": run.num_failed_before + outcomes["failed"]}


def _check_metadata(metadata) -> None:
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(key, str) and len(key) <= 64 and isinstance(value, str) and len(value) <= 512
                       for key, value in metadata.items())):
        raise ApiError(400, "metadata must be an object of at most 16 string pairs (keys up to 64 characters, "
                            "values up to 512)", param="metadata")


def _claim(data_dir: Path) -> BinaryIO:
    """Lock the data folder for this server: two servers resuming the same batches would answer
    their lines twice."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / "lock").open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"another seesaw server uses --data-dir {data_dir}") from None
    return handle
