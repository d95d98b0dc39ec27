"""Hardware and model profiles: the JSON files shipped in `seesaw/sim/profiles/`, merged with the
ones `seesaw-cli calibrate` writes and any a user names (pure: no torch)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path

from seesaw.model.presets import PRESETS
from seesaw.model.spec import ModelSpec

GB = 1e9
_MAY_BE_ZERO = {"latency_us", "copy_overlap", "row_overhead_us"}
_SHARES = {"copy_overlap", "memory_fraction", "matmul_efficiency", "memory_efficiency", "attention_efficiency",
           "efficiency"}
_NODE_RE = re.compile(r"^(\d+)\s*x\s*(.+)$", re.IGNORECASE)
# What the driver calls a device -> its catalogue entry (the datasheet figures its efficiencies are shares of).
_CATALOGUE_NAMES = (
    (re.compile(r"\bH200\b"), "H200"),
    (re.compile(r"\bH100\b.*\bPCIe\b", re.IGNORECASE), "H100-PCIe"),
    (re.compile(r"\bH100\b"), "H100-SXM"),
    (re.compile(r"\bA100\b.*80GB.*PCIE|\bA100\b.*PCIE.*80GB", re.IGNORECASE), "A100-80GB-PCIe"),
    (re.compile(r"\bA100\b.*80GB", re.IGNORECASE), "A100-80GB-SXM"),
    (re.compile(r"\bA100\b.*PCIE", re.IGNORECASE), "A100-40GB-PCIe"),
    (re.compile(r"\bA100\b"), "A100-40GB-SXM"),
    (re.compile(r"\bL4\b"), "L4"),
    (re.compile(r"\bA10G\b"), "A10G"),
    (re.compile(r"\bA10\b"), "A10"),
)


def catalogue_name(device_name: str) -> str | None:
    """The catalogue entry of a device as its driver names it ("NVIDIA H100 80GB HBM3": H100-SXM), or None."""
    return next((name for pattern, name in _CATALOGUE_NAMES if pattern.search(device_name)), None)


@dataclass(frozen=True)
class Gpu:
    """One device: datasheet peaks, fitted efficiencies, and what a node of them usually has."""

    name: str
    memory_gb: float  # the datasheet's figure
    memory_bandwidth_gbs: float
    peak_tflops: float  # dense, at the run's dtype
    interconnect: str  # the link between devices a node of these usually has
    host_link: str  # the link to host memory (KV copies, weight reloads)
    host_memory_gb: float  # host memory per device
    dtype_bytes: int = 2
    matmul_efficiency: float = 0.6  # share of peak FLOPs linear layers reach when bound by compute
    memory_efficiency: float = 0.8  # share of memory bandwidth weight and KV reads reach
    attention_efficiency: float = 0.4  # share of peak FLOPs attention reaches
    step_overhead_ms: float = 4.0  # per step and pipeline stage: scheduling, launches, sampling
    row_overhead_us: float = 0.0  # per row of a step over the whole model: per-request kernels, sampling
    memory_fraction: float = 0.9  # share of device memory the engine may fill
    activation_gb: float = 1.5  # device memory kept for activations and the attention workspace
    kv_cache_gb: float | None = None  # a fixed KV pool per worker (CPU workers); None: what is left
    token_budget: int = 8192  # tokens per step (chunked prefill)
    device: str = "cuda"  # what `seesaw-cli batch --device` runs it as
    copy_overlap: float = 1.0  # share of a KV copy hidden under compute (GPUs copy by DMA; CPU workers do not)
    visible_memory_gib: float | None = None  # what the driver reports as the device's total; None: memory_gb GiB
    source: str = ""

    @property
    def memory_bytes(self) -> float:
        """Device memory the engine sizes its pool from (the driver's total, below the datasheet's
        figure on cards that keep some for ECC and the firmware)."""
        return (self.visible_memory_gib or self.memory_gb) * (1 << 30)

    @property
    def memory_bandwidth(self) -> float:
        """Bytes per second weight and KV reads reach."""
        return self.memory_bandwidth_gbs * GB * self.memory_efficiency


@dataclass(frozen=True)
class Link:
    """A link: peak bandwidth one way per device (for a link between nodes, per node: its GPUs
    share it), what bulk copies reach, and ring all-reduce bus bandwidth by group size where it
    was measured."""

    name: str
    bandwidth_gbs: float
    efficiency: float = 0.8
    latency_us: float = 10.0
    all_reduce_gbs: dict[int, float] | None = None  # group size -> measured bus bandwidth
    source: str = ""

    @property
    def copy_bandwidth(self) -> float:
        """Bytes per second of a bulk copy over this link."""
        return self.bandwidth_gbs * GB * self.efficiency

    def all_reduce_bandwidth(self, group_size: int) -> float:
        """Bus bandwidth of a ring all-reduce over `group_size` devices, bytes per second: the
        measured figure for that size (or the nearest measured size), else the copy bandwidth."""
        if not self.all_reduce_gbs:
            return self.copy_bandwidth
        nearest = min(self.all_reduce_gbs, key=lambda size: (abs(size - group_size), -size))
        return self.all_reduce_gbs[nearest] * GB

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True)
class Node:
    """`num_gpus` devices of one kind, their interconnect, host link and host memory."""

    gpu: Gpu
    num_gpus: int
    interconnect: Link
    host_link: Link
    host_memory_gb: float  # the whole node's
    shm_gb: float | None = None  # what /dev/shm holds; None: half the memory, as Linux mounts it
    available_gb: float | None = None  # memory free for the engine; None: nearly all (an idle node)

    @property
    def shm_bytes(self) -> int:
        return int((self.shm_gb if self.shm_gb is not None else self.host_memory_gb / 2) * (1 << 30))

    @property
    def available_bytes(self) -> int:
        return int((self.available_gb if self.available_gb is not None else 0.95 * self.host_memory_gb) * (1 << 30))

    def __str__(self) -> str:
        return f"{self.num_gpus}x{self.gpu.name} ({self.interconnect.name})"


DEFAULT_NODE_LINK = "eth100g"


class Catalog:
    """Every known GPU, link (inside a node), node link (between nodes) and model, by name
    (case-insensitive)."""

    def __init__(self, extra_files: list[Path] | tuple[Path, ...] = ()):
        self.gpus: dict[str, Gpu] = {}
        self.links: dict[str, Link] = {}
        self.node_links: dict[str, Link] = {}
        self.models: dict[str, dict] = {name: dict(config) for name, config in PRESETS.items()}
        for name in ("gpus.json", "links.json", "models.json", "cpu.json"):
            text = resources.files("seesaw.sim").joinpath("profiles", name).read_text()
            self.add(json.loads(text), f"seesaw/sim/profiles/{name}")
        for path in extra_files:
            self.add_file(Path(path))

    def add_file(self, path: Path) -> None:
        """Merge a profile file (any of the sections gpus, links, node_links, models); later entries win."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"profile file {path} does not exist") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        self.add(data, str(path))

    def add(self, data: dict, where: str) -> None:
        """Merge profile entries given as a dict (as a profile file holds them); later entries win."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a profile file is a JSON object with gpus, links, node_links or models")
        for name, entry in data.get("gpus", {}).items():
            self.gpus[name.lower()] = _build(Gpu, name, entry, f"{where}: gpu {name!r}")
        for name, entry in data.get("links", {}).items():
            entry = dict(entry)
            if entry.get("all_reduce_gbs"):
                entry["all_reduce_gbs"] = _ring_figures(entry["all_reduce_gbs"], f"{where}: link {name!r}")
            self.links[name.lower()] = _build(Link, name, entry, f"{where}: link {name!r}")
        for name, entry in data.get("node_links", {}).items():
            if isinstance(entry, dict) and "all_reduce_gbs" in entry:
                raise ValueError(f"{where}: node link {name!r}: all_reduce_gbs is for links inside a node "
                                 "(tensor parallelism never spans nodes)")
            self.node_links[name.lower()] = _build(Link, name, entry, f"{where}: node link {name!r}")
        for name, entry in data.get("models", {}).items():
            config = {key: value for key, value in entry.items() if key != "source"}
            ModelSpec.from_hf_config(config, f"{where}: model {name!r}")  # fail here, naming the file
            self.models[name.lower()] = config

    def gpu(self, name: str) -> Gpu:
        found = self.gpus.get(name.lower())
        if found is None:
            raise ValueError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in self.gpus.values())}")
        return found

    def link(self, name: str, gpu: Gpu | None = None) -> Link:
        key = name.lower()
        if key == "nvlink" and gpu is not None:
            if not gpu.interconnect.startswith("nvlink"):
                raise ValueError(f"{gpu.name} has no NVLink; give a PCIe link, e.g. pcie4x16")
            key = gpu.interconnect
        key = {"pcie": "pcie4x16"}.get(key, key)
        found = self.links.get(key)
        if found is None:
            raise ValueError(f"unknown interconnect {name!r}; known: {', '.join(sorted(self.links))}, nvlink")
        return found

    def node_link(self, name: str) -> Link:
        """A link between nodes by name (`eth100g`, `ib200g`, ...)."""
        found = self.node_links.get(name.lower())
        if found is None:
            raise ValueError(f"unknown node link {name!r}; known: {', '.join(sorted(self.node_links))}")
        return found

    def model(self, name: str) -> ModelSpec:
        """A model by profile name (`llama2-70b`, `dummy:llama3-8b` or `llama3-8b`), or a folder
        or file holding a Hugging Face config.json."""
        key = name.lower().removeprefix("dummy:")
        if key in self.models:
            return ModelSpec.from_hf_config(self.models[key], f"model {name!r}")
        path = Path(name)
        config_path = path / "config.json" if path.is_dir() else path
        if config_path.is_file() and config_path.suffix == ".json":
            return ModelSpec.from_hf_config(json.loads(config_path.read_text()), str(config_path))
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}, "
                         f"or a folder with a config.json")

    def node(self, gpus: str, interconnect: str | None = None, host_memory_gb: float | None = None,
             shm_gb: float | None = None) -> Node:
        """A node from `8xL4` (count x GPU), with the GPU's usual links unless named."""
        match = _NODE_RE.match(gpus.strip())
        if match is None:
            raise ValueError(f"--gpus {gpus!r} is not COUNTxNAME, for example 8xL4 or 4xA10")
        count, gpu = int(match.group(1)), self.gpu(match.group(2).strip())
        if count < 1:
            raise ValueError(f"--gpus {gpus!r}: a node needs at least one GPU")
        if host_memory_gb is not None and host_memory_gb <= 0:
            raise ValueError(f"--host-memory-gb must be positive, got {host_memory_gb}")
        if shm_gb is not None and shm_gb <= 0:
            raise ValueError(f"--shm-gb must be positive, got {shm_gb}")
        link = self.link(interconnect or gpu.interconnect, gpu)
        host_link = self.link(gpu.host_link, gpu)
        if interconnect is not None and link.name.startswith("pcie"):  # the node's PCIe slots carry host copies too
            host_link = link
        return Node(gpu, count, link, host_link, host_memory_gb or gpu.host_memory_gb * count, shm_gb)


def parse_all_reduce(text: str) -> dict[int, float]:
    """`SIZE=GBS,...` (for example `2=10,8=3.2`) as {group size: GB/s}."""
    figures = {}
    for item in text.split(","):
        size, _, gbs = item.partition("=")
        try:
            figures[int(size)] = float(gbs)
        except ValueError:
            raise ValueError(f"--all-reduce-gbs: {item!r} is not SIZE=GBS (for example 8=3.2)") from None
    return _ring_figures(figures, "--all-reduce-gbs")


def with_all_reduce(node: Node, figures: dict[int, float]) -> Node:
    """The node with these ring all-reduce figures over the link's own (size by size)."""
    link = node.interconnect
    ring = {**(link.all_reduce_gbs or {}), **figures}
    return replace(node, interconnect=replace(link, all_reduce_gbs=ring))


def _ring_figures(figures, where: str) -> dict[int, float]:
    """all_reduce_gbs as {group size: GB/s}, each size at least 2 and each figure positive."""
    if not isinstance(figures, dict):
        raise ValueError(f"{where}: all_reduce_gbs must map group sizes to GB/s")
    ring = {}
    for size, gbs in figures.items():
        try:
            size, gbs = int(size), float(gbs)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: all_reduce_gbs {size!r}: {gbs!r} is not a group size and GB/s") from None
        if size < 2 or not gbs > 0:
            raise ValueError(f"{where}: all_reduce_gbs needs group sizes of 2 or more and positive GB/s, "
                             f"got {size}: {gbs:g}")
        ring[size] = gbs
    return ring


def _build(cls, name: str, entry: dict, where: str):
    """A dataclass from a JSON entry: unknown keys, missing keys and non-positive numbers are
    errors naming the entry and the field."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    known = {field.name for field in fields(cls)}
    unknown = set(entry) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        built = cls(name=name, **entry)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None
    for field in fields(cls):
        value = getattr(built, field.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if value < 0 or (value == 0 and field.name not in _MAY_BE_ZERO):
            raise ValueError(f"{where}: {field.name} must be positive, got {value}")
        if field.name in _SHARES and value > 1:
            raise ValueError(f"{where}: {field.name} is a share, at most 1, got {value}")
    return built
