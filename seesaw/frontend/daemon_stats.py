"""The daemon's stats reply as a typed value: the server's own counts joined with the engine's
(its JSON form, `seesaw.stats.to_json`, is the `stats` frame of docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

from seesaw.stats import KVUse


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
