"""`--layout auto`: which layout (or prefill -> decode pair) to run, planned by the simulator for
this node and this job; and a word when a pair the user named is predicted to lose."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace

from seesaw.config import EngineConfig
from seesaw.layout import Layout
from seesaw.model.spec import ModelSpec

LOSING_PAIR = 0.9  # a named pair predicted below this share of the best static layout gets a warning


def visible_gpu_names() -> list[str]:
    """The names of the GPUs this process may use (CUDA_VISIBLE_DEVICES respected), from the
    driver's tool, so that no CUDA context is made in the head process."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    names = [line.strip() for line in found.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return names
    chosen = [part.strip() for part in visible.split(",") if part.strip()]
    return [names[int(index)] for index in chosen if index.isdigit() and int(index) < len(names)]


def wants_auto(layout: str | None, pair: bool, device: str, workers: int | None) -> bool:
    """Whether the run's layout is planned: asked for (`--layout auto`), or nothing was named and
    more than one device may be used (GPUs visible, or --workers on a CPU)."""
    if layout == "auto":
        return True
    if layout is not None or pair:
        return False
    if device == "cuda":
        return len(visible_gpu_names()) > 1 and (workers is None or workers > 1)
    return workers is not None and workers > 1


def this_node(catalog, device: str, workers: int | None):
    """The simulator's picture of this node: its devices (a CUDA GPU by its catalogue entry, or
    CPU workers by their calibrated profile, else the shipped one), its shared memory and memory."""
    from seesaw.sim.catalog import catalogue_name
    from seesaw.transport.shared_memory import read_node_memory

    memory = read_node_memory()
    if device == "cuda":
        names = visible_gpu_names()
        if not names:
            raise ValueError("--layout auto on --device cuda found no GPU (nvidia-smi lists none); name a layout")
        count = len(names) if workers is None else workers
        if count > len(names):
            raise ValueError(f"--workers {count}: only {len(names)} GPUs are visible")
        entry = catalogue_name(names[0])
        if entry is None:
            raise ValueError(f"--layout auto does not know the {names[0]} (no catalogue entry): name a layout, or "
                             f"calibrate it with seesaw-cli calibrate --device cuda --like A_CATALOGUE_ENTRY")
        gpu = entry
    else:
        count = workers or 1
        gpu = next((name for name in (f"local-cpu-w{count}", f"cpu-w{count}") if name in catalog.gpus), None)
        if gpu is None:
            raise ValueError(f"--layout auto --workers {count} needs this machine's profile for {count} workers: "
                             f"run seesaw-cli calibrate --workers {count} (a few minutes), or name a layout")
    node = catalog.node(f"{count}x{gpu}", shm_gb=memory.shm_free_bytes / (1 << 30))
    return replace(node, available_gb=memory.available_bytes / (1 << 30))


def plan_options(config: EngineConfig):
    """The planner's options for the engine this config makes (budget, caps, thresholds, buffer)."""
    from seesaw.sim.planner import PlanOptions

    scheduler = config.scheduler
    return PlanOptions(token_budget=scheduler.max_num_batched_tokens, max_num_seqs=scheduler.max_num_seqs,
                       block_size=config.cache.block_size, host_buffer_gb=config.cache.host_buffer_gb,
                       host_low_water=scheduler.host_low_water, prefill_min_fill=scheduler.prefill_min_fill,
                       prefill_max_wait_s=scheduler.prefill_max_wait_s, max_model_len=config.model.max_model_len)


def choose_layouts(spec: ModelSpec, config: EngineConfig, workload, workers: int | None,
                   echo: Callable[[str], None], job_scale: float = 1.0) -> tuple[Layout, Layout | None]:
    """Plan every layout and pair of this node for `workload` (a sample of a job `job_scale` times
    as large) and return the choice as (layout, decode layout or None); `echo` gets the two lines
    that say what was chosen and why."""
    from seesaw.sim import planner
    from seesaw.sim.cost import CostModel

    catalog = _catalog()
    node = this_node(catalog, config.model.device, workers)
    cost = CostModel(spec, node)
    options = replace(plan_options(config), job_scale=job_scale)
    ranked = planner.plan(cost, _within(workload, config, spec), options, jobs=max(1, os.cpu_count() or 1))
    choice = planner.choose(ranked)
    if choice is None:
        errors = "; ".join(f"{c.name}: {c.error}" for c in ranked if c.error)[:400]
        raise ValueError(f"--layout auto: no layout of {node} can run this model ({errors})")
    for line in choice.describe().splitlines():
        echo(f"layout auto on {node}: {line}" if line.startswith("chosen") else f"  {line}")
    return choice.best.spec.layout, choice.best.spec.decode_layout


def planned(config: EngineConfig, spec: ModelSpec, workers: int | None, echo: Callable[[str], None], *,
            profile=None, name: str = "") -> EngineConfig:
    """The config with the layouts the planner chose for this node: for a batch job, on its
    profile (its first lines' lengths, scaled to the whole file); for a daemon, whose jobs are not
    known yet, on a chat-like mix. `echo` gets what was planned with and what was chosen."""
    from seesaw.sim.workload import Workload, sharegpt

    if profile is None:
        workload, job_scale = sharegpt(1000), 1.0
        echo("layout auto: planning with a chat-like mix (sharegpt x1000), as a daemon's jobs are not known yet")
    else:
        if not profile.lengths:
            raise ValueError(f"--layout auto: none of the first {profile.num_read} lines of {name} can run, so there "
                             "is nothing to plan with; name a layout")
        workload, job_scale = Workload(name, profile.lengths), profile.num_requests / len(profile.lengths)
        skipped = f"; {len(profile.skipped)} could not be read and were left out" if profile.skipped else ""
        echo(f"layout auto: planning with {len(profile.lengths)} of the {profile.num_lines} lines of {name} "
             f"(the first {profile.num_read} read{skipped})")
    layout, decode_layout = choose_layouts(spec, config, workload, workers, echo, job_scale=job_scale)
    return replace(config, parallel=replace(config.parallel, layout=layout, decode_layout=decode_layout))


def warn_if_pair_loses(config: EngineConfig, spec: ModelSpec, profile, name: str, echo: Callable[[str], None]) -> None:
    """A named pair still runs; if the planner predicts it more than 10% behind the best static
    layout of the same workers for this job, one line says so (nothing when this node has no profile)."""
    from seesaw.sim import planner
    from seesaw.sim.cost import CostModel
    from seesaw.sim.simulator import RunSpec
    from seesaw.sim.workload import Workload

    if not profile.lengths:
        return
    parallel = config.parallel
    try:
        node = this_node(_catalog(), config.model.device, parallel.layout.world_size)
    except ValueError:
        return
    cost = CostModel(spec, node)
    job_scale = profile.num_requests / len(profile.lengths)
    options = replace(plan_options(config), include_pairs=False, job_scale=job_scale)
    work = _within(Workload(name, profile.lengths), config, spec)
    statics = planner.plan(cost, work, options, jobs=max(1, os.cpu_count() or 1))
    static = planner.best(statics, False)
    asked = RunSpec(parallel.layout, parallel.decode_layout, block_size=config.cache.block_size,
                    host_buffer_gb=config.cache.host_buffer_gb, scheduler=options.scheduler(cost),
                    max_model_len=config.model.context_length(spec.max_position))
    pair = planner.evaluate(cost, asked, work, job_scale)
    if static is None or not pair.throughput or pair.throughput >= LOSING_PAIR * static.throughput:
        return
    echo(f"warning: {pair.name} is predicted at {pair.throughput / static.throughput:.2f}x the best static layout "
         f"({static.name}) on {node} for this job; running it as asked (--layout auto would choose for you)")


def _within(workload, config: EngineConfig, spec: ModelSpec):
    from seesaw.sim.workload import within_context

    return within_context(workload, config.model.context_length(spec.max_position))[0]


def _catalog():
    from seesaw.config import default_cache_dir
    from seesaw.sim.catalog import Catalog

    return Catalog(sorted((default_cache_dir() / "profiles").glob("*.json")))
