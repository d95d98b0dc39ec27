"""The planner: simulate every static layout and every prefill -> decode pair a node can run, and
rank them by predicted throughput (pure; runs simulations in worker processes when asked)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

from seesaw.config import CacheConfig, SchedulerConfig
from seesaw.layout import Layout, validate
from seesaw.sim.catalog import Gpu
from seesaw.sim.cost import GIB, CostModel, host_buffer_gb
from seesaw.sim.simulator import RunSpec, SimResult, simulate
from seesaw.sim.workload import Workload


@dataclass(frozen=True)
class PlanOptions:
    token_budget: int | None = None  # None: the GPU profile's
    max_num_seqs: int = 256
    block_size: int = 16
    host_buffer_gb: float | None = None  # None: what the node's host memory leaves
    host_low_water: float = 0.2
    include_static: bool = True
    include_pairs: bool = True

    def __post_init__(self) -> None:
        for name in ("token_budget", "max_num_seqs", "block_size"):
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
    """Static layouts first, then every pair of different layouts with the same replicas."""
    layouts = layouts_of(cost.node.num_gpus, cost)
    scheduler = SchedulerConfig(max_num_batched_tokens=options.token_budget or cost.gpu.token_budget,
                                max_num_seqs=options.max_num_seqs, host_low_water=options.host_low_water)
    base = RunSpec(Layout(), block_size=options.block_size, scheduler=scheduler,
                   max_model_len=cost.spec.max_position)
    runs = []
    if options.include_static:
        runs += [replace(base, layout=layout, host_buffer_gb=host_buffer_for(cost, options, False)) for layout in layouts]
    if options.include_pairs:
        runs += [replace(base, layout=prefill, decode_layout=decode, host_buffer_gb=host_buffer_for(cost, options, True))
                 for prefill in layouts for decode in layouts if prefill != decode and prefill.dp == decode.dp]
    return runs


def host_buffer_for(cost: CostModel, options: PlanOptions, reshards: bool) -> float:
    """The host KV buffer of a static layout (reshards False) or a pair, in GiB."""
    return options.host_buffer_gb if options.host_buffer_gb is not None else host_buffer_gb(cost, reshards)


def evaluate(cost: CostModel, spec: RunSpec, workload: Workload) -> Candidate:
    """Simulate one candidate; a layout that cannot hold the model is a candidate with an error."""
    try:
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
                results = list(pool.map(evaluate, [cost] * len(runs), runs, [workload] * len(runs)))
        except BrokenProcessPool as error:
            raise RuntimeError(f"a simulation process ended abruptly (out of memory?) with {workload.num_requests} "
                               f"requests and {jobs} jobs; try fewer of either") from error
    else:
        results = [evaluate(cost, run, workload) for run in runs]
    return sorted(results, key=lambda c: (c.result is None, -c.throughput, c.name))


def best(candidates_: list[Candidate], seesaw: bool) -> Candidate | None:
    """The best runnable static layout (seesaw False) or pair (seesaw True)."""
    found = [c for c in candidates_ if c.result is not None and c.spec.is_seesaw == seesaw and not c.result.num_failed]
    return max(found, key=lambda c: c.throughput, default=None)


def host_memory_notes(candidate: Candidate, cost: CostModel) -> list[str]:
    """What running a candidate asks of the node's host memory, where it is worth saying: shared
    memory past the half of RAM Linux gives /dev/shm by default, and a host buffer the simulated
    run left mostly empty (the engine reserves and pins all of it at start)."""
    spec, result = candidate.spec, candidate.result
    stored_gib = cost.model_bytes / GIB if spec.is_seesaw and spec.layout != spec.decode_layout else 0.0
    shared_gib = spec.host_buffer_gb + stored_gib
    notes = []
    if shared_gib > cost.node.host_memory_gb / 2:
        what = "the host KV buffer and the weight store" if stored_gib else "the host KV buffer"
        notes.append(f"it keeps {shared_gib:.0f} GiB in shared memory, {what}; /dev/shm must hold that, and "
                     "Linux sizes it at half of RAM unless mounted larger")
    used_gib = result.host_peak_fraction * spec.host_buffer_gb if result is not None else 0.0
    if spec.host_buffer_gb >= 8 and used_gib < spec.host_buffer_gb / 4:
        used = f"used at most {used_gib:.1f} GiB of" if used_gib else "never used"
        notes.append(f"the simulated run {used} its {spec.host_buffer_gb:.1f} GiB host buffer, which the engine "
                     "reserves and pins at start: plan --host-buffer-gb shows what a smaller one changes")
    return notes


def batch_command(candidate: Candidate, model: str, gpu: Gpu) -> str:
    """The `seesaw-cli batch` line that runs a candidate as simulated on `gpu` (a model known only
    by its profile needs the user's checkpoint; a preset runs with random weights)."""
    import math
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
             f"--max-num-batched-tokens {scheduler.max_num_batched_tokens}", f"--max-num-seqs {scheduler.max_num_seqs}",
             f"--host-buffer-gb {math.floor(spec.host_buffer_gb * 10) / 10:g}"]  # never more than simulated
    batch_defaults, cache_defaults = SchedulerConfig(), CacheConfig()  # what `seesaw-cli batch` runs without flags
    if scheduler.host_low_water != batch_defaults.host_low_water:
        flags.append(f"--host-low-water {scheduler.host_low_water:g}")
    if spec.block_size != cache_defaults.block_size:
        flags.append(f"--block-size {spec.block_size}")
    if gpu.kv_cache_gb is not None:
        flags.append(f"--kv-cache-gb {gpu.kv_cache_gb:g}")
    elif gpu.memory_fraction != cache_defaults.memory_fraction:
        flags.append(f"--memory-fraction {gpu.memory_fraction:g}")
    return "seesaw-cli batch INPUT.jsonl " + " ".join(flags)
