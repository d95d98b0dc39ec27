"""Batch progress: a live bar on a terminal, a periodic log line otherwise, and the closing summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class BatchSummary:
    num_ok: int = 0
    num_failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed_s: float = 0.0

    def record(self, ok: bool, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        if ok:
            self.num_ok += 1
        else:
            self.num_failed += 1
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        self.elapsed_s = time.perf_counter() - self.started

    @property
    def num_done(self) -> int:
        return self.num_ok + self.num_failed

    def rates(self) -> tuple[float, float, float]:
        """Requests, total tokens and output tokens per second so far."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return (self.num_done / elapsed, (self.prompt_tokens + self.output_tokens) / elapsed,
                self.output_tokens / elapsed)

    def lines(self) -> list[str]:
        elapsed = max(self.elapsed_s, 1e-9)
        total = self.prompt_tokens + self.output_tokens
        return [
            f"requests: {self.num_ok} ok, {self.num_failed} failed",
            f"tokens:   {self.prompt_tokens} prompt, {self.output_tokens} output",
            f"elapsed:  {self.elapsed_s:.1f} s",
            f"throughput: {self.num_done / elapsed:.2f} requests/s, {total / elapsed:.1f} total tokens/s, "
            f"{self.output_tokens / elapsed:.1f} output tokens/s",
        ]


class Progress:
    """Reports a BatchSummary as it grows; `fraction` is how much of the input has been read."""

    def __init__(self, stream: TextIO, is_terminal: bool, log_every_s: float = 10.0):
        self.stream = stream
        self.is_terminal = is_terminal
        self.log_every_s = log_every_s
        self._last = 0.0

    def update(self, summary: BatchSummary, fraction: float, force: bool = False) -> None:
        now = time.perf_counter()
        interval = 0.2 if self.is_terminal else self.log_every_s
        if not force and now - self._last < interval:
            return
        self._last = now
        req_rate, tok_rate, out_rate = summary.rates()
        status = (
            f"{summary.num_done} done ({summary.num_failed} failed) | {req_rate:.2f} req/s | "
            f"{tok_rate:.0f} tok/s ({out_rate:.0f} output)"
        )
        if self.is_terminal:
            width = 24
            filled = int(width * min(max(fraction, 0.0), 1.0))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} read | {status}\x1b[K")
        else:
            self.stream.write(f"progress: {fraction:.0%} of input read | {status}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.is_terminal:
            self.stream.write("\n")
            self.stream.flush()
