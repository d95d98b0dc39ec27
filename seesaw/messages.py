"""Every message between actors, grouped by receiver, and their orjson wire encoding.

Commands are imperative, events past tense; each docstring names sender -> receiver.
Tensors never ride here: a message names a transfer, the bytes move on the data plane.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field

import orjson

from seesaw.sampling import SamplingParams
from seesaw.step import RowSampling, StepRow, TokenUpdate

# ---------------------------------------------------------------- shared parts


@dataclass(frozen=True)
class GroupSpec:
    """One communicator group: its key (its rank set, "ranks:0,1"), its global ranks in order, and an NCCL id."""

    key: str
    ranks: list[int]
    nccl_id: list[int] | None = None


@dataclass(frozen=True)
class CollectiveSpec:
    """How one replica's workers meet for bulk transfers: gloo through its first rank's TCP store,
    or NCCL ids. A gloo world is one replica: world rank = global rank - first_rank."""

    backend: str  # "gloo" or "nccl"
    world_size: int  # the replica's workers
    groups: list[GroupSpec]
    init_address: str | None = None  # gloo only
    first_rank: int = 0


@dataclass(frozen=True)
class HostBufferSpec:
    """Where the node's host KV buffer lives and how its blocks are shaped."""

    name: str
    num_blocks: int
    block_shape: list[int]  # [layers, 2, kv_heads, block_size, head_dim]
    dtype: str


@dataclass(frozen=True)
class WeightStoreSpec:
    """Where the node's host weight store lives (its layout follows from the model's config)."""

    name: str
    dtype: str
    num_bytes: int


# ---------------------------------------------------------------- to the RequestQueue


@dataclass(frozen=True)
class Submit:
    """front door -> RequestQueue: a user's request, not yet tokenized."""

    request_id: str
    reply_to: str
    kind: str  # "chat" or "completion"
    sampling: SamplingParams
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass(frozen=True)
class TokensGenerated:
    """Scheduler -> RequestQueue: what one step produced."""

    updates: list[TokenUpdate]


@dataclass(frozen=True)
class RequestFailed:
    """Scheduler -> RequestQueue: a request cannot run (too large, or the engine failed)."""

    request_id: str
    error: str
    status_code: int = 500


# ---------------------------------------------------------------- to a front door


@dataclass(frozen=True)
class RequestFinished:
    """RequestQueue -> front door: a request's final result or its error."""

    request_id: str
    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    status_code: int = 200


# ---------------------------------------------------------------- to the Scheduler


@dataclass(frozen=True)
class AddRequest:
    """RequestQueue -> Scheduler: a validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: RowSampling
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(frozen=True)
class StopRequest:
    """RequestQueue -> Scheduler: stop generating this request (stop string or cancel)."""

    request_id: str


@dataclass(frozen=True)
class StepDone:
    """ShardWorker -> Scheduler: a step finished; `sampled` has one token per sampled row."""

    step_id: int
    rank: int
    sampled: list[int]
    compute_ms: float


@dataclass(frozen=True)
class Resharded:
    """ShardWorker -> Scheduler: this worker now holds its shard of `layout`; what loading it cost."""

    rank: int
    layout: str
    drain_s: float  # from the command's arrival until this worker's last step of the old layout was done
    load_s: float
    num_bytes: int


@dataclass(frozen=True)
class EngineReady:
    """Supervisor -> Scheduler, KVTier: every worker is loaded; where they listen, and the
    device pool of each data-parallel replica (the same block ids serve every layout)."""

    num_device_blocks: list[int]
    worker_addresses: list[str]


@dataclass(frozen=True)
class ReplicaLost:
    """Supervisor -> Scheduler, KVTier: a replica's worker died and the replica is restarting;
    its requests start over (keeping what they generated) once it is back."""

    replica: int
    reason: str


@dataclass(frozen=True)
class ReplicaReady:
    """Supervisor -> Scheduler, KVTier: a restarted replica is loaded again: its device pool and
    its workers' addresses, in rank order."""

    replica: int
    num_device_blocks: int
    worker_addresses: list[str]


@dataclass(frozen=True)
class EngineFailed:
    """Supervisor -> Scheduler: the engine cannot go on; fail every request in flight."""

    reason: str


@dataclass(frozen=True)
class KVSaved:
    """KVTier -> Scheduler: every worker of the replica copied its share of the request's KV to the host."""

    request_id: str


@dataclass(frozen=True)
class KVLoaded:
    """KVTier -> Scheduler: every worker of the replica copied its share of the request's KV onto its device."""

    request_id: str


# ---------------------------------------------------------------- to the KVTier


@dataclass(frozen=True)
class SaveKV:
    """Scheduler -> KVTier: copy a request's KV from device blocks (laid out in `layout`) to host blocks."""

    request_id: str
    replica: int
    layout: str
    block_ids: list[int]
    host_block_ids: list[int]


@dataclass(frozen=True)
class LoadKV:
    """Scheduler -> KVTier: copy a request's KV from host blocks into device blocks laid out in `layout`."""

    request_id: str
    replica: int
    layout: str
    host_block_ids: list[int]
    block_ids: list[int]


@dataclass(frozen=True)
class SwappedOut:
    """ShardWorker -> KVTier: this worker's share of the request's KV is in the host buffer."""

    transfer_id: int
    request_id: str
    rank: int
    num_bytes: int
    seconds: float


@dataclass(frozen=True)
class Prefetched:
    """ShardWorker -> KVTier: this worker's share of the request's KV is on its device."""

    transfer_id: int
    request_id: str
    rank: int
    num_bytes: int
    seconds: float


# ---------------------------------------------------------------- to a ShardWorker


@dataclass(frozen=True)
class LoadShard:
    """Supervisor -> ShardWorker: build this worker's shards of the run's layouts (the first is
    loaded now) and its KV arena."""

    hf_config: dict
    weights_folder: str | None  # None: seeded random weights
    weight_store: WeightStoreSpec | None  # set when layouts change: weights come from here instead
    dummy_seed: int
    dtype: str
    device: str  # "cpu" or "cuda" (the worker takes its own device on the host)
    layouts: list[str]
    rank: int
    block_size: int
    kv_cache_bytes: int | None  # None: size the pool from free device memory
    memory_fraction: float
    num_threads: int
    host_buffer: HostBufferSpec | None
    collective: CollectiveSpec | None
    scheduler_address: str
    kv_tier_address: str


@dataclass(frozen=True)
class PrepareGroups:
    """Supervisor -> ShardWorker (a replica's first rank): make the rendezvous for these groups."""

    replica: int
    backend: str
    world_size: int
    first_rank: int
    groups: list[GroupSpec]


@dataclass(frozen=True)
class RunStep:
    """Scheduler -> ShardWorker: run one forward pass over these rows and sample."""

    step_id: int
    rows: list[StepRow]


@dataclass(frozen=True)
class Reshard:
    """Scheduler -> ShardWorker: once the steps before this are done, switch to `layout`."""

    layout: str


@dataclass(frozen=True)
class SwapOut:
    """KVTier -> ShardWorker: copy this worker's share of device blocks (laid out in `layout`) into host blocks."""

    transfer_id: int
    request_id: str
    layout: str
    block_ids: list[int]
    host_block_ids: list[int]


@dataclass(frozen=True)
class Prefetch:
    """KVTier -> ShardWorker: copy this worker's share of host blocks into device blocks laid out in `layout`."""

    transfer_id: int
    request_id: str
    layout: str
    host_block_ids: list[int]
    block_ids: list[int]


@dataclass(frozen=True)
class HeadAlive:
    """Supervisor -> ShardWorker: the head is still there (a worker that stops hearing it exits)."""


@dataclass(frozen=True)
class Shutdown:
    """Supervisor -> ShardWorker: finish, release everything and exit."""


# ---------------------------------------------------------------- to the Supervisor


@dataclass(frozen=True)
class WorkerHello:
    """ShardWorker -> Supervisor: a worker process is up; `rank` -1 asks the head to assign one."""

    rank: int
    pid: int
    hostname: str
    inbox: str  # where the worker listens for commands


@dataclass(frozen=True)
class GroupsPrepared:
    """ShardWorker (a replica's first rank) -> Supervisor: the rendezvous its replica's workers join."""

    replica: int
    collective: CollectiveSpec
    pid: int = 0


@dataclass(frozen=True)
class RankAssigned:
    """Supervisor -> ShardWorker: the rank of a worker that joined without one."""

    rank: int


@dataclass(frozen=True)
class WorkerReady:
    """ShardWorker -> Supervisor: the shard is loaded and the KV arena allocated; how many
    device blocks the arena holds under each of the run's layouts."""

    rank: int
    num_device_blocks: list[int]
    load_s: float
    device_name: str
    pid: int = 0


@dataclass(frozen=True)
class WorkerFailed:
    """ShardWorker (or the Supervisor's own watch) -> Supervisor: a worker cannot go on."""

    rank: int
    error: str
    activity: str  # "" when the head saw the process exit and the worker could not say
    pid: int = 0


@dataclass(frozen=True)
class Heartbeat:
    """ShardWorker -> Supervisor: still alive."""

    rank: int


@dataclass(frozen=True)
class WorkersBusy:
    """Scheduler -> Supervisor: what these workers are doing now, to name it if one fails."""

    ranks: list[int]
    activity: str


# ---------------------------------------------------------------- encoding

Message = typing.Any
_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Submit, TokensGenerated, RequestFailed, RequestFinished, AddRequest, StopRequest, StepDone, Resharded,
        EngineReady, ReplicaLost, ReplicaReady, EngineFailed, KVSaved, KVLoaded, SaveKV, LoadKV, SwappedOut, Prefetched, LoadShard,
        PrepareGroups, RunStep, Reshard, SwapOut, Prefetch, HeadAlive, Shutdown, WorkerHello, GroupsPrepared,
        RankAssigned, WorkerReady, WorkerFailed, Heartbeat, WorkersBusy,
    )
}


def encode(message: Message) -> bytes:
    """orjson bytes of `[type name, fields]`."""
    return orjson.dumps([type(message).__name__, message])


def decode(data: bytes) -> Message:
    """The message `encode` wrote; ValueError on an unknown type or malformed fields."""
    try:
        name, fields = orjson.loads(data)
        return _build(_TYPES[name], fields)
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed message {data[:80]!r}: {error!r}") from None


@functools.cache
def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, fields: dict):
    hints = _hints(cls)
    return cls(**{name: _convert(hints[name], value) for name, value in fields.items()})


def _convert(hint, value):
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return [_build(item, entry) for entry in value]
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if dataclasses.is_dataclass(option):
                return _build(option, value)
    return value
