"""A discrete-event simulation of one engine run (pure, deterministic): the real scheduling cores
(StaticScheduler, or PhaseScheduler for a seesaw pair) decide, modelled workers take the time the
cost model gives.

Each worker is busy until some time; a step goes through its replica's pipeline stages in order,
each stage starting once its workers are free and the previous stage handed over its activations,
so up to `pp` micro-batches are in flight as in the engine. KV copies of a replica queue on its
host links and overlap with compute. A phase switch has every worker reload its new shard as soon
as its own part of the last steps is done; the next steps queue behind that.

A static run may span identical nodes (its ranks fill the head's node first): activations cross
between nodes over the node link, and steps of stages on other nodes wait for their command from
the head and send their tokens back. Copies of a run, one a node, each take their share of the
requests and the job ends with the slowest.
"""

from __future__ import annotations

import gc
import heapq
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

from seesaw.config import SchedulerConfig
from seesaw.layout import Layout
from seesaw.sampling import SamplingParams
from seesaw.scheduling.decisions import Phase, StepPlan, ToDevice, ToHost
from seesaw.scheduling.engine_core import (
    Effect,
    EngineCore,
    ModelLimits,
    Refused,
    StartMove,
    StartReshard,
    StartStep,
    Tokens,
)
from seesaw.scheduling.request import NewRequest
from seesaw.sim.cost import GIB, CostModel
from seesaw.sim.workload import Workload
from seesaw.stats import Timeline, Transition, to_json
from seesaw.step import StepShape


@dataclass(frozen=True)
class RunSpec:
    """What to simulate: a static layout (decode_layout None) or a prefill -> decode pair."""

    layout: Layout
    decode_layout: Layout | None = None
    block_size: int = 16
    host_buffer_gb: float | None = 0.0  # each node's; None: auto (the planner sizes it before a run)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_model_len: int | None = None
    num_nodes: int = 1  # nodes one engine's workers span: ranks fill the head's node, then the next

    def __post_init__(self) -> None:
        value = self.num_nodes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, run: str, **fields) -> RunSpec:
        """A run written `LAYOUT` (static) or `PREFILL-DECODE` (a pair), with any other fields."""
        prefill, _, decode = run.partition("-")
        return cls(Layout.parse(prefill), Layout.parse(decode) if decode else None, **fields)

    @property
    def is_seesaw(self) -> bool:
        return self.decode_layout is not None

    @property
    def layouts(self) -> dict[Phase, Layout]:
        if self.decode_layout is None:
            return {Phase.MIXED: self.layout}
        return {Phase.PREFILL: self.layout, Phase.DECODE: self.decode_layout}

    def __str__(self) -> str:
        """`t4p2`, `p8->t4p2`; over nodes `2 nodes x (d2t4)` or `2 nodes x (p4->t4)` (each node
        holds whole replicas: the layouts are each node's) or `t8p2 across 2 nodes` (replicas
        spanning nodes)."""
        run = f"{self.layout}->{self.decode_layout}" if self.decode_layout else str(self.layout)
        nodes = self.num_nodes
        if nodes > 1 and self.layout.dp % nodes == 0:
            run = "->".join(str(Layout(layout.dp // nodes, layout.tp, layout.pp)) for layout in self.layouts.values())
            return f"{nodes} nodes x ({run})"
        return f"{run} across {nodes} nodes" if nodes > 1 else run


@dataclass
class SimResult:
    """What a simulated run gives: its time and throughput, phases and transitions, and the books
    the engine keeps of a run (`RunMetrics`), kept the same way."""

    run: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    num_failed: int
    num_steps: int
    phase_s: dict[str, float]  # seconds the steps of each phase ran (and waits for weights), summed over replicas
    transitions: list[Transition]
    reload_s: float  # total seconds workers spent reloading weights (mean per replica)
    host_peak_fraction: float
    mean_decode_batch: float
    peak_decode_batch: int
    device_blocks: int
    host_blocks: int
    timeline: Timeline
    counters: dict[str, int]
    num_replicas: int = 1
    first_phase: str = "mixed"
    num_kv_copies: int = 0  # to or from the host buffer, over all replicas

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def metrics(self) -> dict:
        """The run in the form `seesaw-cli batch --metrics-json` writes (what draws a timeline)."""
        return {
            "elapsed_s": self.elapsed_s, "first_phase": self.first_phase, "num_replicas": self.num_replicas,
            "phase_seconds": self.phase_s, "transitions": [asdict(t) for t in self.transitions],
            "timeline": to_json(self.timeline),
        }

    def summary(self) -> dict:
        return {
            "run": self.run, "elapsed_s": round(self.elapsed_s, 3),
            "total_tokens_per_s": round(self.total_tokens_per_s, 1),
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "requests": self.num_requests, "failed": self.num_failed, "steps": self.num_steps,
            "phase_s": {phase: round(seconds, 3) for phase, seconds in self.phase_s.items()},
            "transitions": len(self.transitions), "kv_copies": self.num_kv_copies,
            "reload_s": round(self.reload_s, 3),
            "host_peak_fraction": round(self.host_peak_fraction, 3),
            "mean_decode_batch": round(self.mean_decode_batch, 1), "peak_decode_batch": self.peak_decode_batch,
            "device_blocks": self.device_blocks, "host_blocks": self.host_blocks,
            "counters": self.counters,
        }


@contextmanager
def _collector_paused():
    """Pause Python's cycle collector for a run: its millions of short-lived rows and updates
    hold no cycles, and the collector's passes over the long-lived requests cost a sixth of the
    time (all of it is freed by reference counting as usual)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Route(NamedTuple):
    """Where a replica's pipeline stages sit when some are on another node than the head's."""

    is_remote: tuple[bool, ...]  # by stage: on another node than the head's
    crosses: tuple[bool, ...]  # by stage: its activations go to the next stage on another node
    num_remote_workers: int  # workers the head sends each step's command over the node link


class _Workers:
    """One data-parallel replica's modelled workers: when each is next free, its host links, and
    where its stages sit under each layout (None: all on the head's node)."""

    def __init__(self, num_workers: int, routes: dict[Layout, _Route | None]):
        self.free_at = [0.0] * num_workers  # by position in the replica (pp rank * tp + tp rank)
        self.link_free_at = 0.0
        self.routes = routes


class Simulation:
    """One simulated run; `run()` returns its SimResult. The engine's own core decides (`EngineCore`:
    placement, the scheduling cores, the run's books), on the simulated clock; only the workers
    and their links are modelled."""

    def __init__(self, cost: CostModel, spec: RunSpec, workload: Workload):
        self.cost = cost
        self.spec = spec
        self.workload = workload
        self.layouts = spec.layouts
        layout = spec.layout
        if spec.decode_layout is not None and spec.decode_layout.world_size != layout.world_size:
            raise ValueError(f"{spec}: both layouts must use the same number of workers")
        if spec.decode_layout is not None and spec.decode_layout.dp != layout.dp:
            raise ValueError(f"{spec}: both layouts must have the same number of data-parallel replicas")
        per_node = cost.node.num_gpus
        if layout.world_size > per_node * spec.num_nodes:
            where = "the node has" if spec.num_nodes == 1 else f"{spec.num_nodes} nodes have"
            raise ValueError(f"{spec} needs {layout.world_size} GPUs; {where} {per_node * spec.num_nodes}")
        if spec.num_nodes > 1 and per_node % layout.tp:
            raise ValueError(f"{spec}: tensor-parallel groups of {layout.tp} would span nodes of {per_node} GPUs; "
                             "tensor parallelism stays inside a node")
        if spec.num_nodes > 1 and spec.is_seesaw and per_node % (layout.world_size // layout.dp):
            raise ValueError(f"{spec}: replicas of {layout.world_size // layout.dp} GPUs would span nodes of "
                             f"{per_node}; a prefill -> decode pair re-shards each replica through its node's "
                             "shared memory, so each replica stays inside a node")
        distinct = list(dict.fromkeys(self.layouts.values()))
        self.device_blocks = cost.device_blocks(distinct, spec.block_size)
        host_block_bytes = cost.kv_bytes_per_token * spec.block_size
        if spec.host_buffer_gb is None:
            raise ValueError(f"{spec}: size its host buffer first (planner.with_host_buffer)")
        self.host_blocks = int(spec.host_buffer_gb * GIB) // host_block_bytes * spec.num_nodes  # each node's
        if spec.is_seesaw and self.host_blocks < layout.dp:
            raise ValueError(f"{spec}: a prefill -> decode pair keeps KV in host memory between phases, and its "
                             f"host buffer ({spec.host_buffer_gb:g} GiB) holds no block for a replica")
        self.now = 0.0
        limits = ModelLimits(spec.block_size, spec.max_model_len or 1 << 30, (), self.host_blocks)
        # Prompts with no shared prefix find nothing in the prefix cache: they may share one list.
        scheduler = replace(spec.scheduler, prefix_caching=spec.scheduler.prefix_caching and workload.shared_prefix > 0)
        self.engine = EngineCore(scheduler, self.layouts, limits, clock=lambda: self.now)
        self.workers = [_Workers(layout.tp * layout.pp, {each: self._route(each, replica) for each in self.layouts.values()})
                        for replica in range(layout.dp)]
        self._events: list[tuple[float, int, str, int, object]] = []
        self._seq = 0
        self.reload_total_s = 0.0
        self.num_steps = 0
        self.num_kv_copies = 0
        self.num_failed = 0
        self.failed_tokens = [0, 0]  # prompt and output tokens of requests that failed
        self.finished_at = 0.0

    def _route(self, layout: Layout, replica: int) -> _Route | None:
        """Where a replica's stages sit under `layout`, if any is on another node than the head's
        (the first)."""
        per_node = self.cost.node.num_gpus
        if self.spec.num_nodes == 1:
            return None
        nodes = [layout.rank_of(replica, stage, 0) // per_node for stage in range(layout.pp)]
        if not any(nodes):
            return None
        return _Route(tuple(node != 0 for node in nodes), tuple(a != b for a, b in zip(nodes, nodes[1:])),
                      layout.tp * sum(node != 0 for node in nodes))

    # ------------------------------------------------------------ the loop

    def run(self) -> SimResult:
        with _collector_paused():
            return self._run()

    def _prompt(self, index: int, num_tokens: int, by_length: dict[int, list[int]]) -> list[int]:
        """Request `index`'s prompt: the workload's shared prefix, then tokens of its own (the
        first one is its alone); with no shared prefix, every prompt of a length is one list."""
        shared = self.workload.shared_prefix
        if not shared:
            return by_length.get(num_tokens) or by_length.setdefault(num_tokens, [0] * num_tokens)
        own = num_tokens - shared
        return [0] * shared + ([index + 1] + [0] * (own - 1) if own > 0 else [])

    def _run(self) -> SimResult:
        engine = self.engine
        self._apply(engine.ready([self.device_blocks] * len(self.workers)))
        prompts: dict[int, list[int]] = {}  # one list of token ids per prompt length: the cores only read them
        samplings: dict[int, SamplingParams] = {}  # one per output length
        max_model_len = self.spec.max_model_len
        for index, (prompt, output) in enumerate(self.workload.lengths):
            if max_model_len is not None and prompt + output > max_model_len:
                self._fail(f"r{index}")  # the engine's front door refuses it
                continue
            token_ids = self._prompt(index, prompt, prompts)
            sampling = samplings.get(output) or samplings.setdefault(
                output, SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True))
            self._apply(engine.add(NewRequest(f"r{index}", token_ids, sampling)))
        while self._events:
            self.now, _, kind, replica, payload = heapq.heappop(self._events)
            if kind == "step":
                step_id, num_sampled = payload
                self._apply(engine.step_done(replica, step_id, [0] * num_sampled))
            elif kind == "saved":
                self._apply(engine.kv_saved(payload))
            else:
                self._apply(engine.kv_loaded(payload))
        return self._result()

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out what the core decided, with modelled workers (in the order it gave)."""
        for effect in effects:
            match effect:
                case StartStep(replica, phase, plan, shape):
                    self._step(replica, phase, plan, shape)
                case StartMove(replica, move):
                    self._move(replica, move)
                case StartReshard(replica, layout, index):
                    self._reshard(replica, layout, index)
                case Tokens(updates):
                    if any(update.finish_reason is not None for update in updates):
                        self.finished_at = self.now
                case Refused(request_id):
                    self._fail(request_id)

    def _fail(self, request_id: str) -> None:
        """A request that cannot run: counted, and left out of the tokens produced."""
        prompt, output = self.workload.lengths[int(request_id[1:])]
        self.num_failed += 1
        self.failed_tokens[0] += prompt
        self.failed_tokens[1] += output

    def _push(self, time: float, kind: str, replica: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, kind, replica, payload))

    # ------------------------------------------------------------ modelled workers

    def _step(self, index: int, phase: Phase, plan: StepPlan, shape: StepShape) -> None:
        workers = self.workers[index]
        layout = self.layouts[phase]
        stage_times = self.cost.stage_times(layout, shape)
        route = workers.routes[layout]
        if route is not None:
            end = self._step_over_nodes(workers, route, layout, shape, stage_times)
        else:
            send_s = self.cost.send_s(shape) if layout.pp > 1 else 0.0
            ready, tp, free_at = self.now, layout.tp, workers.free_at
            for stage, seconds in enumerate(stage_times):
                if tp == 1:  # one worker per stage: no slices (a tenth of a p8 run's time)
                    end = free_at[stage] = max(ready, free_at[stage]) + seconds
                else:  # the stage's workers are free_at[first:first + tp]
                    first = stage * tp
                    end = max(ready, *free_at[first:first + tp]) + seconds
                    free_at[first:first + tp] = [end] * tp
                ready = end + send_s  # the next stage starts once this one handed its activations on
        self.num_steps += 1
        self._push(end, "step", index, (plan.step_id, shape.num_sampled))

    def _step_over_nodes(self, workers: _Workers, route: _Route, layout: Layout, shape: StepShape,
                         stage_times: list[float]) -> float:
        """When a step of a replica with stages on other nodes lands at the head: a stage there
        starts once the step's command reached it, activations cross between nodes over the node
        link, and a last stage there sends its tokens back over it."""
        cost, tp, free_at = self.cost, layout.tp, workers.free_at
        command_at = self.now + cost.head_to_node_s(shape, route.num_remote_workers)
        send_s, node_send_s = cost.send_s(shape), cost.node_send_s(shape, tp)
        ready = self.now
        for stage, seconds in enumerate(stage_times):
            if route.is_remote[stage]:
                ready = max(ready, command_at)
            first = stage * tp
            end = max(ready, *free_at[first:first + tp]) + seconds
            free_at[first:first + tp] = [end] * tp
            if stage < len(route.crosses):
                ready = end + (node_send_s if route.crosses[stage] else send_s)
        return end + cost.node_to_head_s(shape) if route.is_remote[-1] else end

    def _move(self, index: int, move: ToHost | ToDevice) -> None:
        workers = self.workers[index]
        num_tokens = len(move.host_block_ids) * self.spec.block_size
        start = max(self.now, workers.link_free_at)
        seconds = self.cost.kv_copy_s(self.layouts[move.phase], num_tokens)
        workers.link_free_at = start + seconds
        self.num_kv_copies += 1
        stolen = (1 - self.cost.gpu.copy_overlap) * seconds
        if stolen:  # the copy takes its time from the workers' compute too
            workers.free_at = [max(free_at, start) + stolen for free_at in workers.free_at]
        self._push(workers.link_free_at, "saved" if isinstance(move, ToHost) else "loaded", index, move.request_id)

    def _reshard(self, index: int, layout: Layout, transition: int) -> None:
        """Each worker reloads its shard of `layout` once its own part of the last steps is done and
        the KV copies already queued on the host links (loads prefetched at the end of prefill
        among them) have gone; the reload holds the links, and the next steps queue behind it."""
        workers = self.workers[index]
        end = self.now
        tp = layout.tp
        for position in range(len(workers.free_at)):
            seconds = self.cost.reload_s(layout, position // tp)
            start = max(workers.free_at[position], self.now, workers.link_free_at)
            workers.free_at[position] = start + seconds
            self.reload_total_s += seconds / len(workers.free_at) / len(self.workers)
            end = max(end, workers.free_at[position])
        workers.link_free_at = max(workers.link_free_at, end)
        self.engine.reloaded(index, transition, end)  # known now: the books take it ahead of time

    def _result(self) -> SimResult:
        counters: dict[str, int] = {}
        for core in self.engine.cores:
            for name, count in core.counters.items():
                counters[name] = counters.get(name, 0) + count
        metrics = self.engine.metrics
        return SimResult(
            run=str(self.spec), elapsed_s=self.finished_at, num_requests=self.workload.num_requests,
            prompt_tokens=self.workload.num_prompt_tokens - self.failed_tokens[0],
            output_tokens=self.workload.num_output_tokens - self.failed_tokens[1],
            num_failed=self.num_failed, num_steps=self.num_steps, phase_s=dict(metrics.phase_seconds),
            transitions=metrics.transitions, reload_s=self.reload_total_s,
            host_peak_fraction=max(core.host.peak_fraction for core in self.engine.cores),
            mean_decode_batch=metrics.decode_rows / metrics.decode_steps if metrics.decode_steps else 0.0,
            peak_decode_batch=metrics.peak_decode_rows, device_blocks=self.device_blocks, host_blocks=self.host_blocks,
            timeline=metrics.timeline_now(), counters=counters, num_replicas=len(self.workers),
            first_phase=metrics.first_phase.value, num_kv_copies=self.num_kv_copies,
        )


def simulate(cost: CostModel, spec: RunSpec, workload: Workload) -> SimResult:
    """Simulate `workload` run as `spec` on the cost model's node (or nodes)."""
    return Simulation(cost, spec, workload).run()
