"""A batch job run inside the daemon for one client: the batch front door, its output lines sent
to the client as frames, reading no more input while the client lags."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Protocol

from seesaw.engine import Engine, EngineError
from seesaw.frontend.batch import BatchRunner
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.protocol import error_frame, frame
from seesaw.messages import ErrorCode

log = logging.getLogger(__name__)


class JobHost(Protocol):
    """What a job needs of the server it runs in."""

    engine: Engine
    defaults: SamplingDefaults
    model_name: str

    def send(self, identity: bytes, data: bytes) -> None: ...

    def is_backlogged(self, identity: bytes) -> bool: ...

    def job_ended(self, job: Job) -> None: ...


class Job:
    """A batch job run for one client: the batch front door, its output lines sent as frames."""

    def __init__(self, server: JobHost, job_id: str, identity: bytes, label: str, source, max_pending: int):
        self.server, self.job_id, self.identity, self.label = server, job_id, identity, label
        self.source = source
        self.state = "running"
        self.task: asyncio.Task | None = None
        self.runner = BatchRunner(server.engine, server.defaults, server.model_name, max_pending,
                                  _JobSink(self), name=job_id)

    async def run(self) -> None:
        server = self.server
        try:
            size = max(self.source.seek(0, io.SEEK_END), 1)
            self.source.seek(0)
            summary = await self.runner.run_source(self.source, size)
            if self.state == "running":
                self.state = "done"
            counts = self.counts(summary)
            server.send(self.identity, frame("job_done", job_id=self.job_id, state=self.state,
                                              num_done=counts["done"], num_failed=counts["failed"],
                                              num_cancelled=counts["cancelled"]))
        except EngineError as error:
            self.state = "failed"
            server.send(self.identity, error_frame(self.label, ErrorCode.ENGINE_FAILED, str(error)))
        except (OSError, ValueError) as error:
            self.state = "failed"
            server.send(self.identity, error_frame(self.label, ErrorCode.INVALID_REQUEST, str(error)))
        except Exception as error:  # a job's failure is its own error, never the server's end
            log.exception("%s failed", self.job_id)
            self.state = "failed"
            server.send(self.identity, error_frame(self.label, ErrorCode.SERVER_ERROR, f"the job failed: {error!r}"))
        finally:
            self.source.close()
            server.job_ended(self)

    def cancel(self) -> None:
        self.state = "cancelled"
        self.runner.cancel()

    def counts(self, summary=None) -> dict[str, int]:
        """Lines answered so far: done (ran to their end), failed, and cancelled (stopped early,
        or given up on when the job ended)."""
        return (summary or self.runner.summary).outcomes()

    def status(self) -> dict:
        counts = self.counts()
        return {"job_id": self.job_id, "state": self.state, "num_lines": self.runner.num_lines,
                "num_done": counts["done"], "num_failed": counts["failed"], "num_cancelled": counts["cancelled"],
                "num_pending": self.runner.num_pending_lines}


class _JobSink:
    """Where a job's output lines go: frames to its client, held back while the client lags."""

    def __init__(self, job: Job):
        self.job = job

    def write(self, line: dict, is_error: bool = False) -> None:
        self.job.server.send(self.job.identity, frame("job_line", job_id=self.job.job_id, line=line))

    @property
    def is_backlogged(self) -> bool:
        return self.job.server.is_backlogged(self.job.identity)
