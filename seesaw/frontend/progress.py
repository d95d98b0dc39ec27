"""Batch progress: a live display on a terminal (rich), a periodic log line otherwise, and the
closing summary. It shows the work as it happens: every generated token counts at once, not only
those of finished requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class BatchSummary:
    num_ok: int = 0
    num_failed: int = 0
    num_skipped: int = 0  # already in the output from an earlier run
    num_abandoned: int = 0  # in flight when an interrupted run gave up on them
    num_cancelled: int = 0  # of the ok ones, cancelled before they finished (a daemon's job)
    prompt_tokens: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed_s: float = 0.0
    is_finished: bool = False  # the run is over: `elapsed_s` stays what it was then

    def record(self, ok: bool, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        if ok:
            self.num_ok += 1
        else:
            self.num_failed += 1
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        self.elapsed_s = time.perf_counter() - self.started

    def finish(self) -> None:
        """Stop the clock (what follows, such as shutting the engine down, is not the run's time)."""
        self.elapsed_s = time.perf_counter() - self.started
        self.is_finished = True

    @property
    def num_done(self) -> int:
        return self.num_ok + self.num_failed

    def outcomes(self) -> dict[str, int]:
        """Lines answered so far, as a daemon counts its requests: done (ran to their end), failed,
        and cancelled (stopped early, or given up on when the run ended)."""
        return {"done": self.num_ok - self.num_cancelled, "failed": self.num_failed,
                "cancelled": self.num_cancelled + self.num_abandoned}

    def lines(self) -> list[str]:
        if not self.is_finished:
            self.elapsed_s = time.perf_counter() - self.started
        elapsed = max(self.elapsed_s, 1e-9)
        total = self.prompt_tokens + self.output_tokens
        counts = f"requests: {self.num_ok} ok, {self.num_failed} failed"
        if self.num_skipped:
            counts += f", {self.num_skipped} already done"
        if self.num_abandoned:
            counts += f", {self.num_abandoned} abandoned"
        return [
            counts,
            f"tokens:   {self.prompt_tokens} prompt, {self.output_tokens} output",
            f"elapsed:  {self.elapsed_s:.1f} s",
            f"throughput: {self.num_done / elapsed:.2f} requests/s, {total / elapsed:.1f} total tokens/s, "
            f"{self.output_tokens / elapsed:.1f} output tokens/s",
        ]


@dataclass(frozen=True)
class Snapshot:
    """The batch right now."""

    fraction_read: float  # of the input file's bytes
    num_lines: int  # lines read that hold something
    num_done: int  # of those, answered (in this run or an earlier one)
    num_failed: int
    num_running: int  # in the engine with KV on a device
    num_waiting: int  # in the engine, waiting to start or in the host buffer
    generated_tokens: int  # every token generated so far, finished requests or not
    elapsed_s: float
    cache_hit_rate: float | None = None  # of the prompt tokens so far, the share the prefix cache served

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left, from the pace so far and the requests the unread input should hold."""
        if not self.num_done or self.fraction_read <= 0:
            return None
        expected = self.num_lines / self.fraction_read
        return max(0.0, expected - self.num_done) * self.elapsed_s / self.num_done

    def describe(self) -> str:
        eta = self.eta_s
        eta_text = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        cache = "" if self.cache_hit_rate is None else f" | cache {self.cache_hit_rate:.0%}"
        return (f"{self.num_done} done ({self.num_failed} failed), {self.num_running} running, "
                f"{self.num_waiting} waiting | {self.tokens_per_s:,.0f} tok/s{cache} | ETA {eta_text}")


class Progress:
    """Shows snapshots as they come: rich's live bar on a terminal, a log line every
    `log_every_s` seconds otherwise."""

    def __init__(self, stream: TextIO, is_terminal: bool, log_every_s: float = 10.0):
        self.stream = stream
        self.is_terminal = is_terminal
        self.log_every_s = log_every_s
        self._last = 0.0
        self._bar = None
        self._task = None

    def is_due(self) -> bool:
        """Whether a new snapshot would be shown now (taking one is not free)."""
        return time.perf_counter() - self._last >= (0.25 if self.is_terminal else self.log_every_s)

    def update(self, snapshot: Snapshot, force: bool = False) -> None:
        if not force and not self.is_due():
            return
        self._last = time.perf_counter()
        if not self.is_terminal:
            self.stream.write(f"progress: {snapshot.fraction_read:.0%} of input read | {snapshot.describe()}\n")
            self.stream.flush()
            return
        if self._bar is None:
            self._start_bar()
        self._bar.update(self._task, completed=snapshot.fraction_read * 100, status=snapshot.describe())

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn

        self._bar = RichProgress(
            TextColumn("read"), BarColumn(bar_width=24), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]}"), console=Console(file=self.stream), transient=False,
        )
        self._task = self._bar.add_task("batch", total=100, status="")
        self._bar.start()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
