"""The daemon's stats reply as a typed value: the server's own counts joined with the engine's
(its JSON form, `seesaw.stats.to_json`, is the `stats` frame of docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from seesaw.stats import EngineStats, KVUse


@dataclass(frozen=True)
class DaemonRequests:
    """Requests answered by outcome over the server's life, and those in flight now."""

    done: int
    failed: int
    cancelled: int
    rejected: int  # malformed frames
    busy: int  # refused as busy
    running: int  # in the engine
    waiting: int
    queued: int  # held by this server


@dataclass(frozen=True)
class TokenCounts:
    """Tokens over the engine's life."""

    prompt: int
    generated: int
    cached: int = 0  # prompt tokens whose KV was found in the prefix cache


@dataclass(frozen=True)
class JobCounts:
    running: int


@dataclass(frozen=True)
class DaemonStats:
    requests: DaemonRequests
    tokens: TokenCounts
    tokens_per_s: float  # generated tokens per second since the previous stats
    uptime_s: float
    phases: list[str]  # each replica's current phase
    transitions: int  # phase switches so far
    kv: KVUse
    jobs: JobCounts
    engine_failure: str | None


OUTCOMES = ("done", "failed", "cancelled", "rejected", "busy")  # how a front door's requests were answered


class StatsBook:
    """A front door's books: its requests by outcome over its life, and the generation rate
    between one stats reply and the next (on the caller's clock)."""

    def __init__(self, now_s: float):
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.started_s = now_s
        self._last_rate = (now_s, 0, 0.0)  # (when, generated tokens, tokens/s)

    def join(self, engine: EngineStats, now_s: float, queued: int, jobs_running: int,
             running_jobs_counts: Iterable[dict[str, int]] = ()) -> DaemonStats:
        """The stats reply: these counts (and those of jobs still running) joined with the engine's."""
        generated = engine.totals.generated_tokens
        when, before, rate = self._last_rate
        if now_s - when >= 0.5:
            rate = (generated - before) / (now_s - when)
            self._last_rate = (now_s, generated, rate)
        counts = dict(self.counts)
        for job_counts in running_jobs_counts:
            for name, count in job_counts.items():
                counts[name] += count
        return DaemonStats(
            requests=DaemonRequests(**counts, running=engine.requests.running, waiting=engine.requests.waiting,
                                    queued=queued),
            tokens=TokenCounts(prompt=engine.totals.prompt_tokens, generated=generated,
                               cached=engine.totals.cached_tokens),
            tokens_per_s=rate,
            uptime_s=now_s - self.started_s,
            phases=engine.phases,
            transitions=engine.run.num_transitions,
            kv=engine.kv,
            jobs=JobCounts(running=jobs_running),
            engine_failure=engine.failure,
        )
