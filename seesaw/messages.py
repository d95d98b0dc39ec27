"""Every message between actors, grouped by receiver, and their orjson wire encoding.

Commands are imperative, events past tense; each docstring names sender -> receiver.
Tensors never ride here: a message names a transfer, the bytes move on the data plane.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum

import orjson

from seesaw.layout import Layout
from seesaw.sampling import SamplingParams
from seesaw.stats import EngineStats
from seesaw.step import FinishReason, PromptLogprobs, StepRow, TokenLogprobs, TokenUpdate
from seesaw.transport.specs import Backend, CollectiveSpec, GroupSpec, HostBufferSpec, WeightStoreSpec

# ---------------------------------------------------------------- shared parts


class RequestKind(StrEnum):
    """Which OpenAI endpoint a request speaks: its prompt form and its reply form."""

    CHAT = "chat"
    COMPLETION = "completion"


class ErrorCode(StrEnum):
    """Why a request got an error instead of a result."""

    INVALID_REQUEST = "invalid_request"  # 400: malformed, or never runnable (too large for the context or the pool)
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # 400
    ENGINE_FAILED = "engine_failed"  # 500: the engine cannot go on
    SERVER_ERROR = "server_error"  # 500: this request failed; the engine goes on


# ---------------------------------------------------------------- to the RequestQueue


@dataclass(frozen=True)
class Submit:
    """front door -> RequestQueue: a user's request, not yet tokenized, under the id its front door's
    EngineClient gave it: the one name every actor, worker and reply uses for it."""

    request_id: str
    reply_to: str
    kind: RequestKind
    sampling: SamplingParams
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    stream: bool = False  # send TextDeltas as tokens arrive
    tools: list[dict] | None = None  # a chat's functions, laid out in its prompt
    tool_choice: str = "none"  # how it uses them: none, auto, required or function


@dataclass(frozen=True)
class CancelRequest:
    """front door -> RequestQueue: stop a request (it is answered with finish_reason "cancelled");
    its KV is freed at once."""

    request_id: str


@dataclass(frozen=True)
class TokensGenerated:
    """Scheduler -> RequestQueue: what one step produced."""

    updates: list[TokenUpdate]


@dataclass(frozen=True)
class RequestFailed:
    """Scheduler -> RequestQueue: a request cannot run (too large for the pool, or lost with a replica)."""

    request_id: str
    error: str
    code: ErrorCode = ErrorCode.SERVER_ERROR


# ---------------------------------------------------------------- to a front door


@dataclass(frozen=True)
class RequestFinished:
    """RequestQueue -> front door: a request's final result or its error (`error` and `code` set)."""

    request_id: str
    kind: RequestKind
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    code: ErrorCode | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, where the request asked
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # one per prompt token; the first's is None
    token_texts: dict[str, TokenText] = field(default_factory=dict)  # each token id the log-probabilities name

    @property
    def status_code(self) -> int:
        """The HTTP status an OpenAI server would give this result."""
        if self.code is None:
            return 200
        return 500 if self.code in (ErrorCode.ENGINE_FAILED, ErrorCode.SERVER_ERROR) else 400


@dataclass(frozen=True)
class TokenText:
    """One token as text (invalid UTF-8 replaced) and its own bytes (a token may hold part of a character)."""

    text: str
    bytes: list[int]


@dataclass(frozen=True)
class TextDelta:
    """RequestQueue -> front door: new text of a streaming request (stop strings already held back)."""

    request_id: str
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class TextDeltas:
    """RequestQueue -> front door: the new text of its streaming requests, one message a step."""

    deltas: list[TextDelta]


@dataclass(frozen=True)
class StatsReport:
    """Scheduler -> whoever sent QueryStats: the engine's stats so far."""

    query_id: int
    stats: EngineStats


# ---------------------------------------------------------------- to the Scheduler


@dataclass(frozen=True)
class AddRequest:
    """RequestQueue -> Scheduler: a tokenized request, its max_tokens fitted to the context."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class StopRequest:
    """RequestQueue -> Scheduler: stop generating this request (stop string or cancel)."""

    request_id: str


@dataclass(frozen=True)
class QueryStats:
    """front door or Engine -> Scheduler: send a StatsReport to `reply_to`."""

    query_id: int
    reply_to: str
    with_timeline: bool = False


@dataclass(frozen=True)
class StepDone:
    """ShardWorker -> Scheduler: a step finished; `sampled` has one token per sampled row, and
    `logprobs` (empty when no row asked) each sampled row's log-probabilities or None."""

    step_id: int
    rank: int
    sampled: list[int]
    compute_ms: float
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class Resharded:
    """ShardWorker -> Scheduler: this worker now holds its shard of `layout`; what loading it cost."""

    rank: int
    layout: Layout
    drain_s: float  # from the command's arrival until this worker's last step of the old layout was done
    load_s: float
    num_bytes: int


@dataclass(frozen=True)
class EngineReady:
    """Supervisor -> Scheduler, KVTier: every worker is loaded; where they listen, and the
    device pool of each data-parallel replica (the same block ids serve every layout)."""

    num_device_blocks: list[int]
    worker_addresses: list[str]
    pin_s: float = 0.0  # the slowest worker's pinning of the host buffer and weight store


@dataclass(frozen=True)
class ReplicaLost:
    """Supervisor -> Scheduler, KVTier: a replica's worker died and the replica is restarting;
    its requests start over (keeping what they generated) once it is back. `is_gone`: its
    workers run on other hosts, which the head cannot restart, so its requests go on on the
    other replicas (it comes back only if its workers join again)."""

    replica: int
    reason: str
    is_gone: bool = False


@dataclass(frozen=True)
class ReplicaReady:
    """Supervisor -> Scheduler, KVTier: a restarted replica is loaded again: its device pool and
    its workers' addresses, in rank order."""

    replica: int
    num_device_blocks: int
    worker_addresses: list[str]


@dataclass(frozen=True)
class EngineFailed:
    """Supervisor, Scheduler -> Engine: the engine cannot go on. Engine -> Scheduler, RequestQueue
    (once): drop every request in flight; the RequestQueue answers each with the reason."""

    reason: str


@dataclass(frozen=True)
class RestartWorkers:
    """Supervisor -> Engine: end these ranks' processes and start new ones (they are this host's)."""

    ranks: list[int]


@dataclass(frozen=True)
class KVSaved:
    """KVTier -> Scheduler: every worker of the replica copied its share of the request's KV to the
    host; the bytes they moved and their copy time, summed over them."""

    request_id: str
    num_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class KVLoaded:
    """KVTier -> Scheduler: every worker of the replica copied its share of the request's KV onto its
    device; the bytes they moved and their copy time, summed over them."""

    request_id: str
    num_bytes: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------- to the KVTier


@dataclass(frozen=True)
class SaveKV:
    """Scheduler -> KVTier: copy a request's KV from device blocks (laid out in `layout`) to host blocks."""

    request_id: str
    replica: int
    layout: Layout
    block_ids: list[int]
    host_block_ids: list[int]


@dataclass(frozen=True)
class LoadKV:
    """Scheduler -> KVTier: copy a request's KV from host blocks into device blocks laid out in `layout`."""

    request_id: str
    replica: int
    layout: Layout
    host_block_ids: list[int]
    block_ids: list[int]
    # For its first host blocks, shared prefix blocks: the requests whose saves wrote them.
    shared_holders: list[str] = field(default_factory=list)


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
    layouts: list[Layout]
    rank: int
    block_size: int
    kv_cache_bytes: int | None  # None: size the pool from free device memory
    memory_fraction: float
    num_threads: int
    host_buffer: HostBufferSpec | None
    collective: CollectiveSpec | None
    scheduler_address: str
    kv_tier_address: str
    join_timeout_s: float = 60.0  # forming the communicator groups gives up after this
    max_step_tokens: int = 2048  # the largest step the scheduler may plan: what a GPU worker profiles
    max_step_rows: int = 256
    max_model_len: int | None = None  # the longest request (sizes the device block table); None: the model's


@dataclass(frozen=True)
class CheckpointSpec:
    """Where a node's weight store is filled from: the checkpoint folder as the head names it (read
    there when this host sees it too), else the head's checkpoint feed; seeded random weights when
    the model has no folder."""

    hf_config: dict
    dtype: str
    weights_folder: str | None
    seed: int
    feed_address: str | None = None  # where the head serves the checkpoint's tensors


@dataclass(frozen=True)
class MakeNodeMemory:
    """Supervisor -> ShardWorker (its node's keeper): create this node's part of the host KV buffer
    for one replica (host blocks first_block .. first_block + num_blocks - 1; none when 0) and,
    with `checkpoint`, the node's weight store filled from it. The keeper owns both and removes
    them when it exits."""

    replica: int
    first_block: int
    num_blocks: int
    block_shape: list[int]
    dtype: str
    checkpoint: CheckpointSpec | None = None


@dataclass(frozen=True)
class PrepareGroups:
    """Supervisor -> ShardWorker (a replica's first rank): make the rendezvous for these groups."""

    replica: int
    backend: Backend
    world_size: int
    first_rank: int
    groups: list[GroupSpec]


@dataclass(frozen=True)
class RunStep:
    """Scheduler -> ShardWorker: run one forward pass over these rows and sample; first forget
    the block tables of `released` requests (finished, or gone from the device)."""

    step_id: int
    rows: list[StepRow]
    released: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reshard:
    """Scheduler -> ShardWorker: once the steps before this are done, switch to `layout`."""

    layout: Layout


@dataclass(frozen=True)
class SwapOut:
    """KVTier -> ShardWorker: copy this worker's share of device blocks (laid out in `layout`) into host blocks."""

    transfer_id: int
    request_id: str
    layout: Layout
    block_ids: list[int]
    host_block_ids: list[int]


@dataclass(frozen=True)
class Prefetch:
    """KVTier -> ShardWorker: copy this worker's share of host blocks into device blocks laid out in `layout`."""

    transfer_id: int
    request_id: str
    layout: Layout
    host_block_ids: list[int]
    block_ids: list[int]


@dataclass(frozen=True)
class HeadAlive:
    """Supervisor -> ShardWorker: the head is still there (a worker that stops hearing it exits)."""


@dataclass(frozen=True)
class Shutdown:
    """Supervisor -> ShardWorker: finish, release everything and exit. Engine -> Supervisor: send
    it to every worker."""


# ---------------------------------------------------------------- to the Supervisor


@dataclass(frozen=True)
class WorkerHello:
    """ShardWorker -> Supervisor: a worker process is up; `rank` None asks the head to assign one."""

    rank: int | None
    pid: int
    hostname: str
    inbox: str  # where the worker listens for commands
    node: str = ""  # which node's shared memory it sees (`node_key`); "" counts as its own node


@dataclass(frozen=True)
class GroupsPrepared:
    """ShardWorker (a replica's first rank) -> Supervisor: the rendezvous its replica's workers join."""

    replica: int
    collective: CollectiveSpec
    pid: int | None = None


@dataclass(frozen=True)
class RankAssigned:
    """Supervisor -> ShardWorker: the rank of a worker that joined without one."""

    rank: int


@dataclass(frozen=True)
class NodeMemoryMade:
    """ShardWorker (a node's keeper) -> Supervisor: the replica's host buffer on this node, and the
    node's weight store when it was asked for one (filled from `source`)."""

    replica: int
    rank: int
    host_buffer: HostBufferSpec | None
    weight_store: WeightStoreSpec | None
    source: str
    seconds: float
    pid: int | None = None


@dataclass(frozen=True)
class WorkerReady:
    """ShardWorker -> Supervisor: the shard is loaded and the KV arena allocated; how many
    device blocks the arena holds under each of the run's layouts."""

    rank: int
    num_device_blocks: list[int]
    load_s: float
    device_name: str
    pid: int | None = None
    pin_s: float = 0.0  # of load_s, pinning the host buffer and weight store for the GPU (0 on a CPU)


@dataclass(frozen=True)
class WorkerFailed:
    """ShardWorker (or the Supervisor's own watch) -> Supervisor: a worker cannot go on."""

    rank: int | None  # None: a worker that never learnt its rank
    error: str
    activity: str | None  # None when the head saw the process exit and the worker could not say
    pid: int | None = None


@dataclass(frozen=True)
class Heartbeat:
    """ShardWorker -> Supervisor: still alive."""

    rank: int


@dataclass(frozen=True)
class WeightsStored:
    """Engine -> Supervisor: the host weight store is filled; replicas may load from it."""


@dataclass(frozen=True)
class WorkersBusy:
    """Scheduler -> Supervisor: what these workers are doing now, to name it if one fails."""

    ranks: list[int]
    activity: str


# ---------------------------------------------------------------- encoding

# What each inbox takes; an actor drops (and logs) anything else.
ToRequestQueue = Submit | CancelRequest | TokensGenerated | RequestFailed | EngineFailed
ToFrontDoor = RequestFinished | TextDeltas | StatsReport
ToScheduler = (AddRequest | StopRequest | QueryStats | StepDone | Resharded | EngineReady | ReplicaLost | ReplicaReady
               | EngineFailed | KVSaved | KVLoaded)
ToKVTier = SaveKV | LoadKV | SwappedOut | Prefetched | EngineReady | ReplicaLost | ReplicaReady
ToShardWorker = (LoadShard | PrepareGroups | RunStep | Reshard | SwapOut | Prefetch | HeadAlive | Shutdown | RankAssigned
                 | MakeNodeMemory)
ToSupervisor = (WorkerHello | GroupsPrepared | WorkerReady | WorkerFailed | Heartbeat | WorkersBusy | WeightsStored
                | Shutdown | NodeMemoryMade)
ToEngine = EngineReady | EngineFailed | RestartWorkers | StatsReport

Message = ToRequestQueue | ToFrontDoor | ToScheduler | ToKVTier | ToShardWorker | ToSupervisor | ToEngine
_TYPES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Message)}


def encode(message: Message) -> bytes:
    """orjson bytes of `[type name, fields]`."""
    return orjson.dumps([type(message).__name__, message])


class Decoder:
    """Makes messages of the types of `accepts` (an inbox's union, or one type) from what `encode`
    wrote; ValueError on any other type, malformed bytes or malformed fields."""

    def __init__(self, accepts=Message):
        self.builders = {cls.__name__: _builder(cls) for cls in typing.get_args(accepts) or (accepts,)}

    def __call__(self, data: bytes) -> Message:
        try:
            name, fields = orjson.loads(data)
        except (orjson.JSONDecodeError, ValueError, TypeError) as error:
            raise ValueError(f"malformed message {data[:80]!r}: {error!r}") from None
        build = self.builders.get(name) if isinstance(name, str) else None
        if build is None:
            known = "an unknown type" if name not in _TYPES else "not a message this inbox takes"
            raise ValueError(f"message {str(name)[:40]!r} is {known}")
        try:
            return build(fields)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed {name} {data[:80]!r}: {error!r}") from None



@functools.cache
def _builder(cls: type) -> typing.Callable[[dict], typing.Any]:
    """A function that makes a `cls` from its decoded fields, converting only the fields whose type
    needs it (nested dataclasses, enums, lists of dataclasses), worked out once per class: a step's
    hundreds of rows are decoded on every worker for every step."""
    converters = [(name, converter) for name, hint in typing.get_type_hints(cls).items()
                  if (converter := _converter(hint)) is not None]

    def build(fields: dict):
        for name, converter in converters:
            value = fields.get(name)
            if value is not None:
                fields[name] = converter(value)
        return cls(**fields)

    return build


def _converter(hint) -> typing.Callable[[typing.Any], typing.Any] | None:
    """What turns a decoded value into one of type `hint`, or None where JSON's value is it."""
    if dataclasses.is_dataclass(hint):
        return _builder(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    origin = typing.get_origin(hint)
    if origin is dict:
        _, value = typing.get_args(hint)
        if dataclasses.is_dataclass(value):
            build_value = _builder(value)
            return lambda entries: {key: build_value(entry) for key, entry in entries.items()}
        return None
    if origin is list:
        (item,) = typing.get_args(hint)
        optional = typing.get_origin(item) in (typing.Union, types.UnionType) and types.NoneType in typing.get_args(item)
        if optional:  # `list[X | None]`
            (item,) = [option for option in typing.get_args(item) if option is not types.NoneType]
        if dataclasses.is_dataclass(item):
            build_item = _builder(item)
            if optional:
                return lambda entries: [None if entry is None else build_item(entry) for entry in entries]
            return lambda entries: [build_item(entry) for entry in entries]
        return None
    if origin in (typing.Union, types.UnionType):  # `X | None`: X's converter (None is left as it is)
        for option in typing.get_args(hint):
            if option is not types.NoneType and (converter := _converter(option)) is not None:
                return converter
    return None


decode = Decoder()  # any message
