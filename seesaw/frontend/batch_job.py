"""One `seesaw-cli batch` run from a loaded engine to the closing summary: start the engine, run
the file, report; on SIGINT or SIGTERM stop reading, give the requests in flight a grace period,
and say how to resume. Every exit path closes the engine (processes, sockets, shared memory)."""

from __future__ import annotations

import asyncio
import gc
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import zmq

from seesaw.engine import Engine, EngineError
from seesaw.frontend.batch import BatchRunner
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.output import KeySet, ResultSink
from seesaw.frontend.progress import BatchSummary, Progress
from seesaw.frontend.report import cache_line, draw_timeline, phase_lines, write_metrics
from seesaw.stats import EngineStats, to_json


@dataclass
class BatchJob:
    """What one batch run needs besides the engine."""

    input_path: Path
    output: Path
    sink: ResultSink
    finished: KeySet  # keys of custom_ids already answered (a resumed run)
    defaults: SamplingDefaults
    max_pending: int
    grace_s: float
    metrics_json: Path | None = None
    timeline: Path | None = None
    argv: list[str] = field(default_factory=list)  # how the run was started, to print how to resume it


@dataclass
class JobResult:
    summary: BatchSummary | None  # None when the engine failed or never started
    signal_number: int | None = None

    @property
    def exit_code(self) -> int:
        if self.signal_number is not None:
            return 128 + self.signal_number  # 130 for SIGINT, 143 for SIGTERM, as shells report them
        return 0 if self.summary is not None else 1


async def run_job(engine: Engine, job: BatchJob, started: float, stream: TextIO = sys.stderr) -> JobResult:
    progress = Progress(stream, is_terminal=stream.isatty())
    # As many lines again as the engine holds are read ahead, so lines sharing a prompt prefix go in together.
    runner = BatchRunner(engine, job.defaults, engine.model.name, job.max_pending, job.sink, job.finished, progress,
                         window=job.max_pending)
    received: list[int] = []
    closing = False
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if closing:
            return  # already shutting down; what follows takes seconds at most
        if not engine.is_ready:  # still starting: nothing in flight to wait for
            main.cancel()
        elif len(received) == 1:
            print(f"\n{name}: reading no more input; {runner.num_pending_lines} requests in flight get up to "
                  f"{job.grace_s:.0f} s to finish (another signal stops at once)", file=stream, flush=True)
            runner.interrupt(job.grace_s)
        else:
            runner.interrupt(0.0)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    summary = metrics = None
    try:
        await engine.start()
        gc.freeze()  # what start-up made (torch, the tokenizer, the actors) lives on: no collection need walk it
        _echo(stream, f"engine ready in {time.perf_counter() - started:.1f} s ({engine.model.name}, "
                      f"{_layouts(engine)}, {engine.config.model.device})")
        if engine.pin_s:
            _echo(stream, f"pinned the host buffer and weight store for the GPUs in {engine.pin_s:.1f} s")
        summary = await runner.run(job.input_path)
        metrics = await engine.query_stats(with_timeline=True)
    except asyncio.CancelledError:
        if not received:
            raise
    except (EngineError, ValueError, OSError, zmq.ZMQError) as error:
        _echo(stream, f"error: {error}")
    finally:
        closing = True
        await engine.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    signum = received[0] if received else None
    if summary is not None:
        for line in summary.lines():
            _echo(stream, line)
        _report(metrics, engine.config.parallel.is_seesaw, job, stream)
    if signum is not None or summary is None:
        _echo(stream, f"results so far are in {job.output}; to finish the batch: {resume_command(job.argv)}")
    return JobResult(summary, signum)


def resume_command(argv: list[str]) -> str:
    """The command that finishes an interrupted batch: the same one, with --resume."""
    args = [arg for arg in argv if arg != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "seesaw-cli " + shlex.join(args)


def _layouts(engine: Engine) -> str:
    parallel = engine.config.parallel
    return f"{parallel.layout} -> {parallel.decode_layout}" if parallel.is_seesaw else str(parallel.layout)


def _report(metrics: EngineStats | None, is_seesaw: bool, job: BatchJob, stream: TextIO) -> None:
    if metrics is None:
        return
    line = cache_line(metrics)
    if line is not None:
        _echo(stream, line)
    if is_seesaw:
        for line in phase_lines(metrics):
            _echo(stream, line)
    form = to_json(metrics)
    for path, write, what in ((job.metrics_json, write_metrics, "metrics"), (job.timeline, draw_timeline, "timeline")):
        if path is None:
            continue
        try:
            write(path, form)
            _echo(stream, f"{what}: {path}")
        except OSError as error:
            _echo(stream, f"error: cannot write the {what} to {path}: {error}")


def _echo(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)
