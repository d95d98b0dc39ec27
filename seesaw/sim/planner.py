"""The planner: simulate every static layout and every prefill -> decode pair a node (or several
identical nodes) can run, and rank them by predicted throughput (pure; runs simulations in worker
processes when asked)."""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

from seesaw.config import CacheConfig, SchedulerConfig
from seesaw.kv.host_sizing import HostBufferPlan
from seesaw.layout import Layout, validate
from seesaw.sim.catalog import Gpu
from seesaw.sim.cost import GIB, CostModel, auto_host_buffer
from seesaw.sim.simulator import RunSpec, SimResult, simulate
from seesaw.sim.workload import Workload, dealt


@dataclass(frozen=True)
class PlanOptions:
    token_budget: int | None = None  # None: the GPU profile's
    max_num_seqs: int = 256
    block_size: int = 16
    host_buffer_gb: float | None = None  # None: auto, as the engine sizes it on the node for the job
    host_low_water: float = 0.2
    prefill_min_fill: float = 0.1
    prefill_max_wait_s: float = 30.0
    include_static: bool = True
    include_pairs: bool = True
    max_model_len: int | None = None  # None: the model's context
    job_scale: float = 1.0  # the job is this many times the workload simulated (auto buffers are sized for it)
    num_nodes: int = 1  # identical nodes, joined by the cost model's node link

    def scheduler(self, cost: CostModel) -> SchedulerConfig:
        return SchedulerConfig(max_num_batched_tokens=self.token_budget or cost.gpu.token_budget,
                               max_num_seqs=self.max_num_seqs, host_low_water=self.host_low_water,
                               prefill_min_fill=self.prefill_min_fill, prefill_max_wait_s=self.prefill_max_wait_s)

    def __post_init__(self) -> None:
        for name in ("token_budget", "max_num_seqs", "block_size", "num_nodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.host_buffer_gb is not None and self.host_buffer_gb < 0:
            raise ValueError(f"host_buffer_gb must not be negative, got {self.host_buffer_gb}")
        if not 0 <= self.host_low_water < 1:
            raise ValueError(f"host_low_water must be in [0, 1), got {self.host_low_water}")


@dataclass
class Candidate:
    """One layout (or pair), its host buffer, and its simulated result or why it cannot run."""

    spec: RunSpec
    result: SimResult | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return str(self.spec)

    @property
    def throughput(self) -> float:
        return self.result.total_tokens_per_s if self.result and not self.result.num_failed else 0.0


def layouts_of(num_gpus: int, cost: CostModel) -> list[Layout]:
    """Every layout of exactly `num_gpus` workers the model's shape allows (memory is checked by
    the simulation)."""
    found = []
    for dp in range(1, num_gpus + 1):
        for tp in range(1, num_gpus // dp + 1):
            if num_gpus % (dp * tp):
                continue
            layout = Layout(dp=dp, tp=tp, pp=num_gpus // (dp * tp))
            try:
                validate(layout, cost.spec.shape)
            except ValueError:
                continue
            found.append(layout)
    return found


def candidates(cost: CostModel, options: PlanOptions) -> list[RunSpec]:
    """Static layouts first, then every pair of different layouts with the same replicas; their
    host buffers are `options.host_buffer_gb`, or None (auto, sized when simulated).

    On several nodes every candidate is one engine over all of them. A static layout's replicas
    either sit whole on each node or have pipeline stages on several (never a tensor-parallel
    group: it stays inside a node); it is simulated without a host buffer, recomputing what it
    evicts. A pair is a node's pair on every node (`dN` times its replicas), each replica inside
    one node, re-sharding through that node's own weight store and host buffer."""
    per_node = cost.node.num_gpus
    layouts = layouts_of(per_node, cost)
    base = RunSpec(Layout(), block_size=options.block_size, scheduler=options.scheduler(cost),
                   max_model_len=options.max_model_len or cost.spec.max_position, host_buffer_gb=options.host_buffer_gb)
    runs = []
    if options.include_static and options.num_nodes == 1:
        runs += [replace(base, layout=layout) for layout in layouts]
    elif options.include_static:
        runs += [replace(base, layout=layout, num_nodes=options.num_nodes, host_buffer_gb=0.0)
                 for layout in layouts_of(options.num_nodes * per_node, cost) if per_node % layout.tp == 0]
    if options.include_pairs:
        nodes = options.num_nodes
        runs += [replace(base, layout=_times(prefill, nodes), decode_layout=_times(decode, nodes), num_nodes=nodes)
                 for prefill in layouts for decode in layouts if prefill != decode and prefill.dp == decode.dp]
    return runs


def _times(layout: Layout, num_nodes: int) -> Layout:
    """A node's layout on each of `num_nodes` nodes: its replicas times the nodes."""
    return Layout(layout.dp * num_nodes, layout.tp, layout.pp)


def host_buffer_for(cost: CostModel, spec: RunSpec, workload: Workload, job_scale: float = 1.0) -> HostBufferPlan:
    """Each node's host KV buffer in a run: the one it names, or what the engine's auto sizing
    gives on the simulated node for a job of `job_scale` times this workload (over nodes, for the
    node's largest share of the requests); none for a static layout over several nodes (a
    ValueError when a pair cannot have enough)."""
    nodes = spec.num_nodes
    if nodes > 1 and not spec.is_seesaw:
        return HostBufferPlan(0, "no host KV buffer: simulated recomputing what it evicts")
    if spec.host_buffer_gb is not None:
        return HostBufferPlan(int(spec.host_buffer_gb * GIB), f"host KV buffer {spec.host_buffer_gb:g} GiB")
    reshards = spec.is_seesaw and spec.layout != spec.decode_layout
    max_model_len = spec.max_model_len or cost.spec.max_position
    job_tokens = max(([p + o for p, o in part.lengths] for part in dealt(workload, nodes)), key=sum)
    layout = Layout(spec.layout.dp // nodes, spec.layout.tp, spec.layout.pp)  # a node's replicas
    return auto_host_buffer(cost, layout, spec.is_seesaw, reshards, job_tokens,
                            spec.block_size, max_model_len, job_scale)


def with_host_buffer(cost: CostModel, spec: RunSpec, workload: Workload, job_scale: float = 1.0) -> RunSpec:
    """The run with its host buffer sized (an auto one resolved to GiB)."""
    if spec.host_buffer_gb is not None:
        return spec
    return replace(spec, host_buffer_gb=host_buffer_for(cost, spec, workload, job_scale).gib)


def evaluate(cost: CostModel, spec: RunSpec, workload: Workload, job_scale: float = 1.0) -> Candidate:
    """Simulate one candidate; a layout that cannot hold the model (or a pair without host room)
    is a candidate with an error."""
    try:
        spec = with_host_buffer(cost, spec, workload, job_scale)
        return Candidate(spec, simulate(cost, spec, workload))
    except ValueError as error:
        return Candidate(spec, error=str(error))


def plan(cost: CostModel, workload: Workload, options: PlanOptions = PlanOptions(), jobs: int = 1) -> list[Candidate]:
    """Every candidate, best predicted throughput first; those that cannot run last."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    runs = candidates(cost, options)
    if jobs > 1 and len(runs) > 1:
        try:
            with ProcessPoolExecutor(jobs) as pool:
                results = list(pool.map(evaluate, [cost] * len(runs), runs, [workload] * len(runs),
                                        [options.job_scale] * len(runs)))
        except BrokenProcessPool as error:
            raise RuntimeError(f"a simulation process ended abruptly (out of memory?) with {workload.num_requests} "
                               f"requests and {jobs} jobs; try fewer of either") from error
    else:
        results = [evaluate(cost, run, workload, options.job_scale) for run in runs]
    return sorted(results, key=lambda c: (c.result is None, -c.throughput, c.name))


MIN_PAIR_GAIN = 0.03  # a pair is chosen over the best static layout only when predicted this much ahead


@dataclass(frozen=True)
class Choice:
    """The run to make, the best of the other kind, and the ratio of their predicted throughputs."""

    best: Candidate
    runner_up: Candidate | None

    @property
    def ratio(self) -> float | None:
        if self.runner_up is None or not self.runner_up.throughput:
            return None
        return self.best.throughput / self.runner_up.throughput

    def describe(self) -> str:
        """Two lines: the choice and the runner-up, with the predicted ratio of the two."""
        best, other = self.best, self.runner_up
        if best.spec.is_seesaw:
            first = f"chosen: {best.name} (prefill -> decode pair), {best.throughput:,.0f} tokens/s predicted"
            if other is None:
                return first + "\nrunner-up: none (no static layout runs here)"
            return (f"{first}, {self.ratio:.2f}x the best static layout\n"
                    f"runner-up: {other.name} (static), {other.throughput:,.0f} tokens/s")
        first = f"chosen: {best.name} (static layout), {best.throughput:,.0f} tokens/s predicted"
        if other is None:
            return first + "\nrunner-up: none (no prefill -> decode pair runs here)"
        return (f"{first}\nrunner-up: {other.name} (the best pair), {other.throughput:,.0f} tokens/s, "
                f"{other.throughput / best.throughput:.2f}x (a pair is chosen {MIN_PAIR_GAIN:.0%} ahead or more)")


def choose(ranked: list[Candidate], min_pair_gain: float = MIN_PAIR_GAIN) -> Choice | None:
    """The best static layout, or the best pair when it is predicted `min_pair_gain` ahead of it
    (switching phases has costs a prediction may miss); None when nothing can run."""
    static, pair = best(ranked, False), best(ranked, True)
    if static is None and pair is None:
        return None
    if pair is not None and (static is None or pair.throughput >= (1 + min_pair_gain) * static.throughput):
        return Choice(pair, static)
    return Choice(static, pair)


def best(candidates_: list[Candidate], seesaw: bool) -> Candidate | None:
    """The best runnable static layout (seesaw False) or pair (seesaw True)."""
    found = [c for c in candidates_ if c.result is not None and c.spec.is_seesaw == seesaw and not c.result.num_failed]
    return max(found, key=lambda c: c.throughput, default=None)


def right_sized(cost: CostModel, candidate: Candidate, workload: Workload, margin: float = 0.1) -> Candidate:
    """The candidate with the host buffer its simulated run needed: the most it held, `margin`
    more, and never less than a pair needs for one request of the model's full length per
    replica. A static layout that evicted nothing is left to auto (its buffer only ever parks
    evicted requests, and auto gives it a few GiB). Kept
    only if the run with it is predicted within 1% of the run with the larger one (the phase
    machine's thresholds are shares of the buffer, so a smaller one can change its decisions)."""
    spec, result = candidate.spec, candidate.result
    if result is None or spec.host_buffer_gb is None:
        return candidate
    if not result.host_peak_fraction and not spec.is_seesaw:
        return Candidate(replace(spec, host_buffer_gb=None), result)  # auto gives it the same, unused
    block_bytes = cost.kv_bytes_per_token * spec.block_size
    least = -(-(spec.max_model_len or cost.spec.max_position) // spec.block_size) * block_bytes * spec.layout.dp
    needed_gib = max(result.host_peak_fraction * spec.host_buffer_gb * (1 + margin),
                     least / GIB if spec.is_seesaw else 0.0)
    needed_gib = min(spec.host_buffer_gb, math.ceil(needed_gib * 10) / 10)
    if needed_gib >= spec.host_buffer_gb:
        return candidate
    smaller = evaluate(cost, replace(spec, host_buffer_gb=needed_gib), workload)
    return smaller if smaller.throughput >= 0.99 * candidate.throughput else candidate


def host_memory_notes(candidate: Candidate, cost: CostModel) -> list[str]:
    """What running a candidate asks of the node's shared memory, where it is worth saying: more
    than /dev/shm holds on the simulated node."""
    spec = candidate.spec
    stored_gib = cost.model_bytes / GIB if spec.is_seesaw and spec.layout != spec.decode_layout else 0.0
    shared_gib = (spec.host_buffer_gb or 0.0) + stored_gib
    if shared_gib <= cost.node.shm_bytes / GIB:
        return []
    what = "the host KV buffer and the weight store" if stored_gib else "the host KV buffer"
    return [f"it keeps {shared_gib:.0f} GiB in shared memory, {what}; /dev/shm holds {cost.node.shm_bytes / GIB:.0f} "
            "GiB on this node (Linux mounts it at half of RAM unless told otherwise)"]


def batch_command(candidate: Candidate, model: str, gpu: Gpu) -> str:
    """The `seesaw-cli batch` line that runs a candidate as simulated on `gpu` (a model known only
    by its profile needs the user's checkpoint; a preset runs with random weights)."""
    from pathlib import Path

    from seesaw.model.presets import PRESETS

    if model.lower() in PRESETS:
        model = f"dummy:{model.lower()}"
    elif not model.startswith("dummy:") and not Path(model).exists():
        model = f"YOUR_{model.upper().replace('-', '_')}_CHECKPOINT"
    spec = candidate.spec
    layout = (f"--prefill-layout {spec.layout} --decode-layout {spec.decode_layout}" if spec.is_seesaw
              else f"--layout {spec.layout}")
    scheduler = spec.scheduler
    flags = [f"--model {model}", f"--device {gpu.device}", layout,
             f"--max-num-batched-tokens {scheduler.max_num_batched_tokens}", f"--max-num-seqs {scheduler.max_num_seqs}"]
    if spec.host_buffer_gb is not None and (spec.num_nodes == 1 or spec.is_seesaw):  # static over nodes: none simulated
        flags.append(f"--host-buffer-gb {math.floor(spec.host_buffer_gb * 10) / 10:g}")  # never more than simulated
    batch_defaults, cache_defaults = SchedulerConfig(), CacheConfig()  # what `seesaw-cli batch` runs without flags
    for flag, name in (("--host-low-water", "host_low_water"), ("--prefill-min-fill", "prefill_min_fill"),
                       ("--prefill-max-wait", "prefill_max_wait_s")):
        if getattr(scheduler, name) != getattr(batch_defaults, name):
            flags.append(f"{flag} {getattr(scheduler, name):g}")
    if spec.block_size != cache_defaults.block_size:
        flags.append(f"--block-size {spec.block_size}")
    if gpu.kv_cache_gb is not None:
        flags.append(f"--kv-cache-gb {gpu.kv_cache_gb:g}")
    elif gpu.memory_fraction != cache_defaults.memory_fraction:
        flags.append(f"--memory-fraction {gpu.memory_fraction:g}")
    return "seesaw-cli batch INPUT.jsonl " + " ".join(flags)


HEAD_ADDRESS = "tcp://HEAD:PORT"  # the head node's address and a free port, as the other nodes reach it


def node_commands(candidate: Candidate, model: str, gpu: Gpu, gpus_per_node: int) -> list[tuple[str, str]]:
    """How to run a candidate over several nodes with the engine's own flags, as (where, command)
    lines. One engine over the nodes: the head on the first node starts its workers, and each
    other node's workers join it with their ranks named, so that every replica and stage sits
    where it was simulated (a pair's replicas each inside one node)."""
    spec = candidate.spec
    line = batch_command(candidate, model, gpu)
    if spec.num_nodes == 1:
        return [("on the node", line)]
    others = (f"on the second node, its {gpus_per_node} workers" if spec.num_nodes == 2 else
              f"on each other node, its {gpus_per_node} workers (NODE its number, 1 to {spec.num_nodes - 1})")
    workers = (f"n={'1' if spec.num_nodes == 2 else 'NODE'}; for i in $(seq 0 {gpus_per_node - 1}); do "
               f"seesaw-cli worker --head {HEAD_ADDRESS} --rank $((n * {gpus_per_node} + i)) --local-rank $i & done; wait")
    return [("on the first node, the head (HEAD is its address as the other nodes reach it)",
             f"{line} --head-address {HEAD_ADDRESS} --local-workers {gpus_per_node}"),
            (others, workers)]
