"""What a run did, phase by phase: time in each phase measured from the steps that ran, transitions
and their costs, decode batch sizes and host buffer fill, kept small enough for runs of any length
(pure; the caller supplies the clock, so the engine and the simulator keep the same books)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from seesaw.scheduling.decisions import Phase
from seesaw.stats import RunSummary, Timeline, Transition

MAX_SAMPLES = 20_000
TRANSITION = "transition"  # the phase_seconds key of the time between a replica's phases


@dataclass
class TimelineSampler:
    """Samples taken at steps: time, replica, phase, decode rows, host buffer fill (thinned to
    every n-th sample as the run grows)."""

    at_s: list[float] = field(default_factory=list)
    replica: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    host_fill: list[float] = field(default_factory=list)
    stride: int = 1
    _skipped: int = 0

    def add(self, at_s: float, replica: int, phase: str, decode_rows: int, host_fill: float) -> None:
        self._skipped += 1
        if self._skipped < self.stride:
            return
        self._skipped = 0
        self.at_s.append(at_s)
        self.replica.append(replica)
        self.phase.append(phase)
        self.decode_rows.append(decode_rows)
        self.host_fill.append(host_fill)
        if len(self.at_s) >= MAX_SAMPLES:
            for name in ("at_s", "replica", "phase", "decode_rows", "host_fill"):
                setattr(self, name, getattr(self, name)[::2])
            self.stride *= 2


class _StepRecord(NamedTuple):
    """A step in flight, as the books need it (a tuple: the simulator makes hundreds of thousands)."""

    phase: str
    dispatched_s: float
    epoch: int  # how many switches its replica had made when it was planned
    num_decode_rows: int
    decode_context_tokens: int | None  # tokens its rows attend when every row decodes; None otherwise


@dataclass(slots=True)
class _ReplicaBooks:
    phase: Phase
    phase_name: str = ""
    last_done_s: float | None = None  # when its latest step finished
    epoch: int = 0
    reloaded_s: float | None = None  # when its workers were all in the current phase's layout
    span: list | None = None  # its latest of `spans`, extended while its phase goes on

    def __post_init__(self) -> None:
        self.phase_name = self.phase.value


class RunMetrics:
    """Counters the Scheduler (or the simulator) feeds as the run goes; `summary()` is what the user sees.

    A phase's seconds are those its steps ran: each finished step adds the time since its replica's
    step before it finished (or since it was sent, if the replica was idle), so idle time counts
    nowhere. The first step after a switch waits for the new layout's weights; that wait is the
    transition's, counted apart."""

    def __init__(self, now_s: float, phases: list[Phase]):
        self.started_s = now_s
        self.first_phase = phases[0] if phases else Phase.MIXED
        self._replicas = [_ReplicaBooks(phase) for phase in phases]
        self._in_flight: dict[tuple[int, int], _StepRecord] = {}
        self.phase_seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.decode = {"decode_steps": 0, "decode_s": 0.0, "decode_rows": 0, "decode_context_tokens": 0}
        self.decode_rows = 0
        self.decode_steps = 0
        self.peak_decode_rows = 0
        self.peak_host_fill = 0.0
        self.transitions: list[Transition] = []
        self.restarts = 0
        self.timeline = TimelineSampler()
        self.spans: list[list] = []  # [replica, phase, start_s, end_s]: the phases as the steps ran them

    @property
    def phase(self) -> list[Phase]:
        """Each replica's current phase."""
        return [books.phase for books in self._replicas]

    def on_step(self, now_s: float, replica: int, step_id: int, num_decode_rows: int, context_tokens: int,
                num_rows: int, host_fill: float) -> None:
        """A step was sent to the workers."""
        books = self._replicas[replica]
        name = books.phase_name
        self.steps[name] = self.steps.get(name, 0) + 1
        if num_decode_rows:
            self.decode_rows += num_decode_rows
            self.decode_steps += 1
            if num_decode_rows > self.peak_decode_rows:
                self.peak_decode_rows = num_decode_rows
        decode_context = context_tokens if num_decode_rows == num_rows else None
        self._in_flight[(replica, step_id)] = _StepRecord(name, now_s, books.epoch, num_decode_rows, decode_context)
        if host_fill > self.peak_host_fill:
            self.peak_host_fill = host_fill
        self.timeline.add(now_s - self.started_s, replica, name, num_decode_rows, host_fill)

    def on_step_done(self, now_s: float, replica: int, step_id: int) -> None:
        """A step finished: the time since its replica's step before it goes to its phase."""
        record = self._in_flight.pop((replica, step_id), None)
        if record is None:
            return
        books = self._replicas[replica]
        start = record.dispatched_s if books.last_done_s is None else max(record.dispatched_s, books.last_done_s)
        if record.epoch == books.epoch and books.reloaded_s is not None and books.reloaded_s > start:
            waited = min(books.reloaded_s, now_s) - start  # the new layout's weights were still coming in
            self._add_seconds(TRANSITION, waited)
            self._extend_span(replica, TRANSITION, start, start + waited)
            start += waited
        self._add_seconds(record.phase, now_s - start)
        self._extend_span(replica, record.phase, start, now_s)
        if record.decode_context_tokens is not None and books.last_done_s is not None:
            # A decode-only step adds to the run the time since the step before it finished.
            self.decode["decode_steps"] += 1
            self.decode["decode_s"] += now_s - books.last_done_s
            self.decode["decode_rows"] += record.num_decode_rows
            self.decode["decode_context_tokens"] += record.decode_context_tokens
        books.last_done_s = now_s

    def on_host(self, host_fill: float) -> None:
        self.peak_host_fill = max(self.peak_host_fill, host_fill)

    def on_switch(self, now_s: float, replica: int, phase: Phase, direction: str, reloads: bool = True) -> int:
        """Record a switch; returns its index for the workers' reports. A switch that `reloads`
        no weights (both phases in one layout) has nothing to wait for."""
        books = self._replicas[replica]
        books.phase, books.phase_name = phase, phase.value
        books.epoch += 1
        books.reloaded_s = None
        at_s = now_s - self.started_s
        self.transitions.append(Transition(replica, phase.value, direction, at_s,
                                           reloaded_at_s=None if reloads else at_s))
        return len(self.transitions) - 1

    def on_reloaded(self, now_s: float, index: int) -> None:
        """Every worker of the transition's replica is in the new layout (a simulator may say so
        ahead of time, with the time the reload will end)."""
        transition = self.transitions[index] = replace(self.transitions[index], reloaded_at_s=now_s - self.started_s)
        books = self._replicas[transition.replica]
        if index == self._latest_transition(transition.replica):
            books.reloaded_s = now_s

    def _latest_transition(self, replica: int) -> int | None:
        return next((i for i in range(len(self.transitions) - 1, -1, -1) if self.transitions[i].replica == replica),
                    None)

    def on_restart(self, now_s: float, replica: int, phase: Phase) -> None:
        """A replica lost a worker and starts over in its first phase."""
        self._in_flight = {key: record for key, record in self._in_flight.items() if key[0] != replica}
        self._replicas[replica] = _ReplicaBooks(phase)
        self.restarts += 1

    def on_resharded(self, index: int, drain_s: float, load_s: float, num_bytes: int) -> None:
        transition = self.transitions[index]
        self.transitions[index] = replace(transition, drain_s=max(transition.drain_s, drain_s),
                                          load_s=max(transition.load_s, load_s),
                                          num_bytes=transition.num_bytes + num_bytes,
                                          num_workers_done=transition.num_workers_done + 1)

    def _add_seconds(self, name: str, seconds: float) -> None:
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds

    def _extend_span(self, replica: int, name: str, start_s: float, end_s: float) -> None:
        span = self._replicas[replica].span
        if span is not None and span[1] == name:
            span[3] = end_s - self.started_s
            return
        span = [replica, name, start_s - self.started_s, end_s - self.started_s]
        self._replicas[replica].span = span
        self.spans.append(span)

    def timeline_now(self) -> Timeline:
        """The timeline's samples and spans so far (copies: the books go on)."""
        timeline = self.timeline
        return Timeline(at_s=list(timeline.at_s), replica=list(timeline.replica), phase=list(timeline.phase),
                        decode_rows=list(timeline.decode_rows), host_fill=list(timeline.host_fill),
                        spans=[list(span) for span in self.spans])

    def summary(self, now_s: float, with_transitions: bool = True) -> RunSummary:
        """Totals so far: per-phase seconds are summed over replicas. Each transition is listed
        only `with_transitions` (a long-running server's list only grows); the count always is."""
        return RunSummary(
            elapsed_s=now_s - self.started_s,
            first_phase=self.first_phase.value,
            num_replicas=len(self._replicas),
            phase_seconds=dict(self.phase_seconds),
            steps=dict(self.steps),
            mean_decode_batch=self.decode_rows / self.decode_steps if self.decode_steps else 0.0,
            peak_decode_batch=self.peak_decode_rows,
            peak_host_fill=self.peak_host_fill,
            replica_restarts=self.restarts,
            num_transitions=len(self.transitions),
            transitions=list(self.transitions) if with_transitions else None,
        )
