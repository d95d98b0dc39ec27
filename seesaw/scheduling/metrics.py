"""What a run did, phase by phase: transitions and their costs, time and steps in each phase,
decode batch sizes and host buffer fill, kept small enough for runs of any length (pure; the
caller supplies the clock)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from seesaw.scheduling.decisions import Phase

MAX_SAMPLES = 20_000


@dataclass
class Transition:
    """One replica's switch between layouts; costs are the slowest worker's, bytes all workers'."""

    replica: int
    phase: str  # the phase it switched to
    direction: str  # "p2->t2"
    at_s: float  # since the run started
    drain_s: float = 0.0  # waiting for the old layout's last steps
    load_s: float = 0.0  # copying the new shard in
    num_bytes: int = 0
    num_workers_done: int = 0


@dataclass
class Timeline:
    """Samples taken at steps: time, replica, phase, decode rows, host buffer fill (thinned to
    every n-th sample as the run grows)."""

    at_s: list[float] = field(default_factory=list)
    replica: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    host_fill: list[float] = field(default_factory=list)
    stride: int = 1
    _skipped: int = 0

    def add(self, at_s: float, replica: int, phase: Phase, decode_rows: int, host_fill: float) -> None:
        self._skipped += 1
        if self._skipped < self.stride:
            return
        self._skipped = 0
        for name, value in (("at_s", at_s), ("replica", replica), ("phase", phase.value),
                            ("decode_rows", decode_rows), ("host_fill", host_fill)):
            getattr(self, name).append(value)
        if len(self.at_s) >= MAX_SAMPLES:
            for name in ("at_s", "replica", "phase", "decode_rows", "host_fill"):
                setattr(self, name, getattr(self, name)[::2])
            self.stride *= 2


class RunMetrics:
    """Counters the Scheduler feeds as the run goes; `summary()` is what the user sees."""

    def __init__(self, now_s: float, phases: list[Phase]):
        self.started_s = now_s
        self.first_phase = phases[0] if phases else Phase.MIXED
        self.phase = list(phases)  # each replica's current phase
        self._phase_since = [now_s] * len(phases)
        self.phase_seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.decode_rows = 0
        self.decode_steps = 0
        self.peak_decode_rows = 0
        self.peak_host_fill = 0.0
        self.transitions: list[Transition] = []
        self.restarts = 0
        self.timeline = Timeline()

    def on_step(self, now_s: float, replica: int, num_decode_rows: int, host_fill: float) -> None:
        phase = self.phase[replica]
        self.steps[phase.value] = self.steps.get(phase.value, 0) + 1
        if num_decode_rows:
            self.decode_rows += num_decode_rows
            self.decode_steps += 1
            self.peak_decode_rows = max(self.peak_decode_rows, num_decode_rows)
        self.on_host(host_fill)
        self.timeline.add(now_s - self.started_s, replica, phase, num_decode_rows, host_fill)

    def on_host(self, host_fill: float) -> None:
        self.peak_host_fill = max(self.peak_host_fill, host_fill)

    def on_switch(self, now_s: float, replica: int, phase: Phase, direction: str) -> int:
        """Record a switch; returns its index for the workers' reports."""
        self._close_phase(now_s, replica)
        self.phase[replica] = phase
        self.transitions.append(Transition(replica, phase.value, direction, now_s - self.started_s))
        return len(self.transitions) - 1

    def on_restart(self, now_s: float, replica: int, phase: Phase) -> None:
        """A replica lost a worker and starts over in its first phase."""
        self._close_phase(now_s, replica)
        self.phase[replica] = phase
        self.restarts += 1

    def on_resharded(self, index: int, drain_s: float, load_s: float, num_bytes: int) -> None:
        transition = self.transitions[index]
        transition.drain_s = max(transition.drain_s, drain_s)
        transition.load_s = max(transition.load_s, load_s)
        transition.num_bytes += num_bytes
        transition.num_workers_done += 1

    def _close_phase(self, now_s: float, replica: int) -> None:
        name = self.phase[replica].value
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + now_s - self._phase_since[replica]
        self._phase_since[replica] = now_s

    def timeline_dict(self) -> dict[str, list]:
        timeline = self.timeline
        return {"at_s": timeline.at_s, "replica": timeline.replica, "phase": timeline.phase,
                "decode_rows": timeline.decode_rows, "host_fill": timeline.host_fill}

    def summary(self, now_s: float, with_transitions: bool = True) -> dict:
        """Totals so far: per-phase seconds are summed over replicas. Each transition is listed
        only `with_transitions` (a long-running server's list only grows); the count always is."""
        for replica in range(len(self.phase)):
            self._close_phase(now_s, replica)
        return {
            "elapsed_s": now_s - self.started_s,
            "first_phase": self.first_phase.value,
            "num_replicas": len(self.phase),
            "phase_seconds": dict(self.phase_seconds),
            "steps": dict(self.steps),
            "mean_decode_batch": self.decode_rows / self.decode_steps if self.decode_steps else 0.0,
            "peak_decode_batch": self.peak_decode_rows,
            "peak_host_fill": self.peak_host_fill,
            "replica_restarts": self.restarts,
            "num_transitions": len(self.transitions),
            **({"transitions": [asdict(t) for t in self.transitions]} if with_transitions else {}),
        }
