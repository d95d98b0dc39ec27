"""Engine configuration: a handful of frozen slices, validated once; only the CLI builds them."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from seesaw.layout import Layout
from seesaw.protocol_terms import MAX_FRAME_BYTES

GIB = 1 << 30
_DEVICES = ("cpu", "cuda")
_DTYPES = ("float32", "bfloat16", "float16")


def is_loopback(address: str) -> bool:
    """Whether `address` stays on this host: ipc:// and inproc://, or tcp:// to a loopback host
    (127.x.x.x, localhost, ::1). Any other host, wildcards included, can be reached from outside."""
    scheme, separator, rest = address.partition("://")
    if not separator:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(";")[2].rpartition(":")[0]  # tcp://[source;]host:port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_cache_dir() -> Path:
    """Where converted models and built kernels are kept: $SEESAW_CACHE_DIR or ~/.cache/seesaw."""
    return Path(os.environ.get("SEESAW_CACHE_DIR", Path.home() / ".cache" / "seesaw"))


def default_data_dir() -> Path:
    """Where the HTTP API keeps files and batches: $XDG_DATA_HOME/seesaw or ~/.local/share/seesaw."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "seesaw"


@dataclass(frozen=True)
class ModelConfig:
    model: str = "default"
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0  # for dummy weights and unseeded sampling

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.device == "cuda" else "float32")

    def context_length(self, max_position: int) -> int:
        """The most tokens a request may hold: the model's context, or less with `max_model_len`."""
        return min(self.max_model_len, max_position) if self.max_model_len else max_position


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_gb: float | None = None  # per worker; None: 2 GiB on CPU, free memory on CUDA
    memory_fraction: float = 0.9  # CUDA: share of the card Seesaw may fill
    host_buffer_gb: float | None = None  # None: auto, sized from what the node has (and the job needs)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if not 0.05 <= self.memory_fraction < 1.0:
            raise ValueError(f"memory_fraction must be in [0.05, 1): the driver, NCCL and the attention "
                             f"workspace need some of the card, got {self.memory_fraction}")
        if self.host_buffer_gb is not None and self.host_buffer_gb < 0:
            raise ValueError(f"host_buffer_gb must not be negative, got {self.host_buffer_gb}")

    def kv_cache_bytes(self, device: str) -> int | None:
        if self.kv_cache_gb is not None:
            return int(self.kv_cache_gb * GIB)
        return 2 * GIB if device == "cpu" else None


@dataclass(frozen=True)
class ParallelConfig:
    """Static mode runs `layout` for everything; seesaw mode (`decode_layout` set) prefills in
    `layout` and decodes in `decode_layout`, on the same workers."""

    layout: Layout = field(default_factory=Layout)
    decode_layout: Layout | None = None
    threads_per_worker: int | None = None  # CPU: None splits the machine's cores evenly
    num_local_workers: int | None = None  # None: the head starts the whole world itself

    def __post_init__(self) -> None:
        decode = self.decode_layout
        if decode is not None and decode.world_size != self.layout.world_size:
            raise ValueError(
                f"prefill layout {self.layout} has {self.layout.world_size} workers and decode layout "
                f"{decode} has {decode.world_size}; both phases run on the same workers"
            )
        if decode is not None and decode.dp != self.layout.dp:
            raise ValueError(
                f"prefill layout {self.layout} has {self.layout.dp} data-parallel replicas and decode layout "
                f"{decode} has {decode.dp}; re-sharding happens within each replica, so both need the same dp"
            )
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be positive, got {self.threads_per_worker}")
        if self.num_local_workers is not None and not 0 <= self.num_local_workers <= self.layout.world_size:
            raise ValueError(
                f"num_local_workers must be between 0 and {self.layout.world_size} for {self.layout}, "
                f"got {self.num_local_workers}"
            )

    @property
    def is_seesaw(self) -> bool:
        """Whether prefill and decode run as separate phases (in layouts that may differ)."""
        return self.decode_layout is not None

    @property
    def prefill_layout(self) -> Layout:
        return self.layout

    @property
    def layouts(self) -> list[Layout]:
        """The run's distinct layouts, the one workers start in first."""
        return list(dict.fromkeys([self.layout, self.decode_layout or self.layout]))

    @property
    def reshards(self) -> bool:
        """Whether phases change the workers' shards (and so need the host weight store)."""
        return len(self.layouts) > 1

    def local_workers(self) -> int:
        return self.layout.world_size if self.num_local_workers is None else self.num_local_workers

    def threads(self) -> int:
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // max(1, self.local_workers()))


@dataclass(frozen=True)
class TransportConfig:
    head_address: str | None = None  # tcp://HOST:PORT where workers on other hosts join
    worker_start_timeout_s: float = 600.0
    step_timeout_s: float = 600.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    max_restarts: int = 3  # replicas restarted after a worker is lost, over the whole run
    join_timeout_s: float = 60.0  # workers not joined, or groups not formed, by then: say why and stop
    advertise_address: str | None = None  # this host's address as workers reach it (default: by route)

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must not be negative, got {self.max_restarts}")
        if self.head_address is not None and not self.head_address.startswith("tcp://"):
            raise ValueError(f"head_address must be tcp://HOST:PORT, got {self.head_address!r}")
        for name in ("worker_start_timeout_s", "step_timeout_s", "heartbeat_interval_s",
                     "heartbeat_timeout_s", "shutdown_timeout_s", "join_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI HTTP API's address, keys, data folder and bounds (`seesaw-cli serve --http`)."""

    host: str
    port: int
    data_dir: Path  # uploaded files, batches and their outputs
    api_keys: tuple[str, ...] = ()  # Bearer tokens taken; none: no check (loopback only)
    max_body_bytes: int = MAX_FRAME_BYTES  # a JSON request body
    max_upload_bytes: int = 512 << 20  # one uploaded file
    max_batches: int = 4  # batches running at once
    max_streams: int = 256  # streamed requests open at once
    max_batch_pending: int = 4096  # a batch's requests in the engine at once
    read_timeout_s: float = 30.0  # for a request's body (an upload's included) to arrive whole

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"the --http port must be 0 to 65535, got {self.port}")
        if not is_loopback(f"tcp://{self.host}:{self.port}") and not self.api_keys:
            raise ValueError(f"--http {self.host}:{self.port} is reachable from other hosts: give --api-key "
                             f"or --api-key-file, or bind a loopback address such as 127.0.0.1")
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            raise ValueError("an API key must be a non-empty string without spaces")
        for name in ("max_body_bytes", "max_upload_bytes", "max_batches", "max_streams", "max_batch_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be positive, got {self.read_timeout_s}")


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) as a host and a port; ValueError names what is wrong."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ValueError(f"--http must be HOST:PORT, got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True)
class ServeConfig:
    """The daemon's front doors and their bounds (`seesaw-cli serve`): the ZeroMQ socket at
    `address`, the HTTP API when `http` is given, or both."""

    address: str | None  # ipc://PATH or tcp://HOST:PORT; None: no ZeroMQ socket
    curve_secret_key: Path | None = None  # needed for a tcp address off this host
    max_queued: int = 4096  # requests held at once before "busy"
    max_jobs: int = 16  # batch jobs at once before "busy"
    max_job_pending: int = 256  # a job's requests in the engine at once
    max_frame_bytes: int = MAX_FRAME_BYTES
    high_water_mark: int = 10_000  # replies queued in ZeroMQ per client
    receive_high_water_mark: int = 64  # frames queued in ZeroMQ per client (each up to max_frame_bytes)
    max_backlog_frames: int = 10_000  # replies held beyond that; past it the client counts as gone
    retry_after_s: float = 0.5  # the hint sent with "busy"
    drain_timeout_s: float = 60.0
    job_stop_timeout_s: float = 5.0
    client_stall_s: float = 60.0  # a client whose held replies did not move for this long counts as gone
    metrics_port: int | None = None
    http: HttpConfig | None = None

    def __post_init__(self) -> None:
        if self.address is None and self.http is None:
            raise ValueError("serve needs a ZeroMQ address (--bind) or an HTTP one (--http)")
        if self.address is not None and not self.address.startswith(("ipc://", "tcp://")):
            raise ValueError(f"bind must be ipc://PATH or tcp://HOST:PORT, got {self.address!r}")
        if self.address is not None and not is_loopback(self.address) and self.curve_secret_key is None:
            raise ValueError(f"{self.address} is reachable from other hosts: give --curve-secret-key "
                             f"(make a pair with `seesaw-cli keys DIR`), or bind a loopback or ipc address")
        for name in ("max_queued", "max_jobs", "max_job_pending", "max_frame_bytes", "high_water_mark",
                     "receive_high_water_mark", "max_backlog_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.drain_timeout_s < 0 or self.retry_after_s <= 0:
            raise ValueError("drain_timeout_s must not be negative and retry_after_s must be positive")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be a TCP port, got {self.metrics_port}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling limits and the seesaw phase thresholds; validated once."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    watermark: float = 0.01  # fraction of device blocks kept free when admitting requests
    host_low_water: float = 0.2  # seesaw: back to prefill once the host buffer is this empty
    # seesaw: and once the waiting prompts would fill this share of the host buffer, or the oldest
    # has waited this long, or decode has nothing left to do (two weight reloads are worth a batch)
    prefill_min_fill: float = 0.1
    prefill_max_wait_s: float = 30.0
    prefetch: bool = True  # seesaw: load host requests for decode while the last prefill steps run
    overlap: bool = True  # single-stage layouts: plan the next step while one runs (two in flight)
    prefix_caching: bool = True  # full blocks of KV are kept and shared by requests with the same prefix

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if not 0.0 <= self.host_low_water < 1.0:
            raise ValueError(f"host_low_water must be in [0, 1), got {self.host_low_water}")
        if not 0.0 <= self.prefill_min_fill <= 1.0:
            raise ValueError(f"prefill_min_fill must be in [0, 1], got {self.prefill_min_fill}")
        if self.prefill_max_wait_s < 0:
            raise ValueError(f"prefill_max_wait_s must not be negative, got {self.prefill_max_wait_s}")


def default_token_budget(device: str) -> int:
    """Tokens per step: CPU matmuls are most efficient around 512 rows, GPUs want thousands."""
    return 512 if device == "cpu" else 8192


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    cache_dir: Path = field(default_factory=default_cache_dir)
