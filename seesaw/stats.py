"""The engine's live stats as one typed value (what the Scheduler reports and front doors read), and
their JSON form: what `--metrics-json` writes and the daemon's stats reply is built from."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

# How a field appears in the JSON form (`to_json`), beyond its name and value.
FLAT = {"flat": True}  # its entries go straight into the enclosing object
OPTIONAL = {"optional": True}  # left out while None


@dataclass(frozen=True)
class Transition:
    """One replica's switch between layouts; costs are the slowest worker's, bytes all workers'."""

    replica: int
    phase: str  # the phase it switched to
    direction: str  # "p2->t2"
    at_s: float  # when it was decided, since the run started
    drain_s: float = 0.0  # waiting for the old layout's last steps
    load_s: float = 0.0  # copying the new shard in
    num_bytes: int = 0
    num_workers_done: int = 0
    reloaded_at_s: float | None = None  # when the replica's last worker was in the new layout


@dataclass(frozen=True)
class Timeline:
    """Samples taken at steps (time, replica, phase, decode rows, host buffer fill), and each
    replica's phases as its steps ran them: `[replica, phase, start_s, end_s]`."""

    at_s: list[float]
    replica: list[int]
    phase: list[str]
    decode_rows: list[int]
    host_fill: list[float]
    spans: list[list]


@dataclass(frozen=True)
class RunSummary:
    """The run's books so far: per-phase seconds and steps summed over replicas, batch sizes, the
    host buffer's peak fill, restarts and transitions (each listed only when asked for)."""

    elapsed_s: float
    first_phase: str
    num_replicas: int
    phase_seconds: dict[str, float]  # by phase name, and "transition" for waits for weights
    steps: dict[str, int]  # by phase name
    mean_decode_batch: float
    peak_decode_batch: int
    peak_host_fill: float
    replica_restarts: int
    num_transitions: int
    transitions: list[Transition] | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class Totals:
    """Counts and seconds summed over the run: the engine core's own, the decode-only steps', and
    the scheduling cores' counters by name (which differ between static and seesaw mode)."""

    compute_s: float  # worker time inside steps, summed over replicas
    requests_added: int
    prompt_tokens: int
    generated_tokens: int
    written_bytes: int  # KV copied to the host buffer
    written_s: float
    read_bytes: int  # KV copied back from it
    read_s: float
    decode_steps: int  # decode-only steps, and what they ran
    decode_s: float
    decode_rows: int
    decode_context_tokens: int
    counters: dict[str, int] = field(default_factory=dict, metadata=FLAT)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV requests found in the prefix cache instead of computing it."""
        return self.counters.get("cached_tokens", 0)

    @property
    def cache_hit_rate(self) -> float | None:
        """The share of prompt tokens served from the prefix cache (None before any prompt)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


@dataclass(frozen=True)
class RequestCounts:
    """Requests with KV on a device or moving, and those waiting (to start, in the host buffer, or
    for their replica to restart)."""

    running: int
    waiting: int


@dataclass(frozen=True)
class KVUse:
    """The device pools' and the host buffer's blocks, over the replicas that are up."""

    device_blocks: int
    device_blocks_used: int
    host_blocks: int
    host_blocks_used: int


@dataclass(frozen=True)
class HostBufferUse:
    """The host buffer's size as planned, why, and the time pinning it for the GPUs took."""

    gib: float
    reason: str
    pin_s: float


@dataclass(frozen=True)
class EngineStats:
    """What the engine reports of itself: the run's books, totals, live request counts, KV pool
    use, each replica's phase and the engine's failure (None while it runs); the timeline when
    asked for, and the host buffer plan once the engine adds it."""

    run: RunSummary = field(metadata=FLAT)
    totals: Totals
    requests: RequestCounts
    kv: KVUse
    phases: list[str]
    failure: str | None
    timeline: Timeline | None = field(default=None, metadata=OPTIONAL)
    host_buffer: HostBufferUse | None = field(default=None, metadata=OPTIONAL)


def to_json(value) -> dict:
    """A stats value's JSON form: each field under its name (nested values in their own form),
    a `FLAT` field's entries in the enclosing object, an `OPTIONAL` field left out while None."""
    form: dict = {}
    for part in fields(value):
        item = getattr(value, part.name)
        if item is None and part.metadata.get("optional"):
            continue
        if part.metadata.get("flat"):
            form.update(_json(item))
        else:
            form[part.name] = _json(item)
    return form


def _json(item):
    if is_dataclass(item):
        return to_json(item)
    if isinstance(item, list):
        return [_json(entry) for entry in item]
    if isinstance(item, dict):
        return {key: _json(entry) for key, entry in item.items()}
    return item
