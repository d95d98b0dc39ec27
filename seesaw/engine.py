"""The head process: wires RequestQueue, Scheduler, KVTier and Supervisor, spawns the workers, and
tears everything down again, leaving no process, socket or shared-memory segment behind.

The engine has an inbox like every actor. It takes EngineReady (Supervisor), EngineFailed (any
actor that finds the engine cannot go on, or its own watch over the actors' tasks), RestartWorkers
(Supervisor) and StatsReport (Scheduler, for `query_stats`). It passes a failure on once, to the
Scheduler and the RequestQueue, which answers every request in flight with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.actors.kv_tier import KVTier
from seesaw.actors.request_queue import RequestQueue
from seesaw.actors.scheduler import Scheduler
from seesaw.actors.node_memory import NodeMemoryPlan
from seesaw.actors.supervisor import Supervisor
from seesaw.config import EngineConfig
from seesaw.scheduling.grammars import Grammars
from seesaw.text import TextCodec
from seesaw.kv.block_pool import blocks_for
from seesaw.kv.host_slots import split_host_blocks
from seesaw.kv.host_sizing import GIB, HostBufferPlan, NodeMemory, auto_host_buffer, check_host_buffer, few_pools_warning
from seesaw.layout import shard_for
from seesaw.messages import (
    Backend,
    CheckpointSpec,
    CollectiveSpec,
    EngineFailed,
    EngineReady,
    LoadShard,
    NodeMemoryMade,
    QueryStats,
    RestartWorkers,
    Shutdown,
    StatsReport,
    ToEngine,
    WeightsStored,
    WorkerFailed,
)
from seesaw.model.resolve import ResolvedModel
from seesaw.model.weights import RandomSource, SafetensorsSource, neutral_shapes
from seesaw.scheduling.decisions import Phase
from seesaw.scheduling.engine_core import ModelLimits
from seesaw.stats import EngineStats, HostBufferUse
from seesaw.transport.addresses import advertise_ip, reachable
from seesaw.transport.channels import Inbox, Outbox
from seesaw.transport.checkpoint_feed import CheckpointFeed
from seesaw.transport.host_buffer import HostBuffer, torch_dtype
from seesaw.transport.shared_memory import SHM_DIR, Reaper, hold_lock, node_key, read_node_memory, reclaim_orphans
from seesaw.transport.weight_store import WeightStore, store_bytes
from seesaw.worker import WorkerOptions

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine could not start or cannot go on."""


@dataclass(frozen=True)
class _Feed:
    feed: CheckpointFeed
    address: str  # as workers on other nodes reach it


class _EngineInbox(Actor):
    """The engine's own inbox, drained like any actor's."""

    name = "engine"
    accepts = ToEngine

    def __init__(self, inbox: Inbox, engine: Engine):
        super().__init__(inbox)
        self.engine = engine

    def handle(self, message):
        self.engine.handle(message)


class Engine:
    """Start with `await engine.start()`; front doors send Submit to `request_queue_address` and
    QueryStats to `scheduler_address`. `job_kv_blocks`, the KV blocks a known job (a batch file)
    may hold at once at most, caps an auto-sized host buffer; `node_memory` stands in for what
    this node's /dev/shm and memory offer."""

    def __init__(self, config: EngineConfig, model: ResolvedModel, codec: TextCodec | None = None, *,
                 job_kv_blocks: int | None = None, node_memory: NodeMemory | None = None):
        self.config = config
        self.model = model
        self.spec = model.spec
        self.codec = codec
        parallel = config.parallel
        for layout in parallel.layouts:
            for rank in range(layout.world_size):
                shard_for(layout, self.spec.shape, rank)  # fail fast on impossible layouts
        if parallel.is_seesaw and config.cache.host_buffer_gb is not None and config.cache.host_buffer_gb <= 0:
            raise ValueError("--prefill-layout and --decode-layout pass every request's KV through the host "
                             "buffer: --host-buffer-gb must be positive")
        self.max_model_len = config.model.context_length(self.spec.max_position)
        # Sized (and checked against /dev/shm) now, before anything starts.
        self.host_buffer_plan = self._plan_host_buffer(node_memory or read_node_memory(), job_kv_blocks)
        self.context: zmq.asyncio.Context | None = None
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self.is_ready = False
        self.start_s = 0.0
        self.pin_s = 0.0  # GPU: the slowest worker's pinning of the host buffer and weight store
        self._ready = asyncio.Event()
        self._stats: dict[int, asyncio.Future] = {}  # query id -> the StatsReport awaited
        self._next_query_ids = itertools.count()
        self._actors: list[Actor] = []
        self._outboxes: list[Outbox] = []
        self._processes: dict[int, subprocess.Popen] = {}  # the current process of each local rank
        self._retired: list[subprocess.Popen] = []  # processes ended by a restart, reaped at close
        self._restarts: list[asyncio.Task] = []  # respawns waiting for the old processes to go
        self._watch: asyncio.Task | None = None
        self._closing = False
        self._run_dir: Path | None = None
        self._host_buffer: HostBuffer | None = None
        self._weight_store: WeightStore | None = None
        self._store_filled: threading.Event | None = None  # set once the filling thread is done
        self._reaper: Reaper | None = None
        self._feed: _Feed | None = None  # the checkpoint, served to nodes that cannot read its folder
        self._inboxes: dict[str, Inbox] = {}
        self._senders: dict[str, Outbox] = {}

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        started = time.perf_counter()
        for leftover in reclaim_orphans([SHM_DIR, Path(tempfile.gettempdir())]):
            log.warning("removed %s, left behind by a run that no longer exists", leftover)
        self.context = zmq.asyncio.Context()
        self._reaper = Reaper()  # removes what follows should this process be killed
        self._run_dir = Path(tempfile.mkdtemp(prefix=f"seesaw-run-{os.getpid()}-"))
        self._reaper.watch(self._run_dir)
        self._run_dir_lock = os.open(self._run_dir, os.O_RDONLY)
        hold_lock(self._run_dir_lock)
        self._host_buffer = self._make_host_buffer()
        self._bind_inboxes()
        self._start_feed()
        self._spawn_workers()  # they start while the tokenizer (and the weight store) load here
        if self.codec is None:
            self.codec = await asyncio.to_thread(TextCodec, self.model.tokenizer_folder)
        self._wire_actors()  # the Supervisor gathers and watches the workers from now on
        self._watch = asyncio.get_running_loop().create_task(self._watch_processes())
        if self._makes_store:
            self._store_filled = threading.Event()
            await asyncio.to_thread(self._make_weight_store, self._store_filled)
            self._send("supervisor", WeightsStored())
        # The Supervisor fails the engine when the workers miss the start timeout; this wait is
        # only a backstop in case that message never comes.
        timeout_s = self.config.transport.worker_start_timeout_s + 30
        waiters = [asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self.failed.wait())]
        done, pending = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if self.failure is not None:
            raise EngineError(self.failure)
        if not done:
            raise EngineError(f"the engine did not start within {timeout_s:.0f} s")
        self.start_s = time.perf_counter() - started

    def address(self, name: str) -> str:
        """Where a head inbox listens: a local socket file, or TCP when workers may join from afar."""
        head = self.config.transport.head_address
        if head is None:
            return f"ipc://{self._run_dir}/{name}"
        if name == "supervisor":
            return head
        return head.rsplit(":", 1)[0] + ":*"

    def _for_workers(self, name: str) -> str:
        """Where workers reach a head inbox."""
        return self._reachable(self._inboxes[name].bound_address)

    def _reachable(self, address: str) -> str:
        """A bound address as workers reach it: a wildcard host replaced by the address workers can
        reach this host at (--advertise-address, else the routed one)."""
        transport = self.config.transport
        if transport.head_address is None:
            return address
        ip = transport.advertise_address or advertise_ip("10.255.255.255", None, os.environ)
        return reachable(address, ip)

    @property
    def request_queue_address(self) -> str:
        return f"inproc://{self._run_dir.name}/request-queue"

    @property
    def scheduler_address(self) -> str:
        return self._inboxes["scheduler"].bound_address

    def reply_address(self, name: str) -> str:
        """An in-process address for a front door's inbox."""
        return f"inproc://{self._run_dir.name}/{name}"

    def _host_block_shape(self) -> list[int]:
        spec = self.spec
        return [spec.num_layers, 2, spec.num_kv_heads, self.config.cache.block_size, spec.head_dim]

    @property
    def replicas_here(self) -> int:
        """The replicas with a worker the head starts: their workers on this node use its host
        buffer. Each node holds the host blocks of its own replicas; this one sizes every replica's."""
        parallel = self.config.parallel
        per_replica = parallel.layout.world_size // parallel.layout.dp
        return min(parallel.layout.dp, -(-parallel.local_workers() // per_replica))

    @property
    def _makes_store(self) -> bool:
        """Whether the head fills a weight store: the run re-shards and the head starts workers."""
        return self.config.parallel.reshards and self.replicas_here > 0

    def _plan_host_buffer(self, memory: NodeMemory, job_kv_blocks: int | None) -> HostBufferPlan:
        """This node's host buffer size and why: the one asked for (checked against /dev/shm), or
        auto, for the replicas here (one when all run elsewhere: other nodes hold the same per replica)."""
        config, parallel = self.config, self.config.parallel
        dtype = config.model.resolved_dtype
        model_bytes = store_bytes(neutral_shapes(self.spec), dtype)
        weight_store_bytes = model_bytes if parallel.reshards else 0
        asked_gb = config.cache.host_buffer_gb
        if asked_gb is not None:
            check_host_buffer(int(asked_gb * GIB), memory, weight_store_bytes)
            return HostBufferPlan(int(asked_gb * GIB), f"host KV buffer {asked_gb:g} GiB (--host-buffer-gb)")
        block_bytes = math.prod(self._host_block_shape()) * torch_dtype(dtype).itemsize
        replicas = max(1, self.replicas_here)
        num_workers = replicas * parallel.layout.world_size // parallel.layout.dp
        if config.model.device == "cpu":  # the workers' weights and KV pools live in host memory too
            process_bytes = model_bytes + num_workers * (config.cache.kv_cache_bytes("cpu") + GIB // 2)
        else:
            process_bytes = num_workers * GIB
        min_bytes = blocks_for(self.max_model_len, config.cache.block_size) * block_bytes * replicas
        job_bytes = None if job_kv_blocks is None else -(-job_kv_blocks * replicas // parallel.layout.dp) * block_bytes
        return auto_host_buffer(memory, store_bytes=weight_store_bytes, process_bytes=process_bytes,
                                min_bytes=min_bytes, job_bytes=job_bytes,
                                is_seesaw=parallel.is_seesaw, num_workers=num_workers,
                                pool_bytes=config.cache.kv_cache_bytes(config.model.device))

    @property
    def num_host_blocks(self) -> int:
        """The engine's host blocks over all nodes: every replica holds as many as one here does."""
        block_bytes = math.prod(self._host_block_shape()) * torch_dtype(self.config.model.resolved_dtype).itemsize
        per_replica = self.host_buffer_plan.num_bytes // block_bytes // max(1, self.replicas_here)
        return per_replica * self.config.parallel.layout.dp

    def _make_host_buffer(self) -> HostBuffer | None:
        """The host blocks of the replicas here (the first ones); other nodes' keepers make theirs."""
        num_blocks = self.num_host_blocks // self.config.parallel.layout.dp * self.replicas_here
        if not num_blocks:
            return None
        return HostBuffer.create(num_blocks, self._host_block_shape(), self.config.model.resolved_dtype,
                                 reaper=self._reaper)

    def _make_weight_store(self, finished: threading.Event) -> None:
        """The whole model once in shared memory, filled from the checkpoint (or seeded random
        values); runs on a thread, which stops early (and says so through `finished`) if the
        engine closes meanwhile, so close() never unmaps the store under it."""
        try:
            started = time.perf_counter()
            spec, model = self.spec, self.model
            self._weight_store = WeightStore.create(neutral_shapes(spec), self.config.model.resolved_dtype, self._reaper)
            source = (SafetensorsSource(model.weights_folder) if model.weights_folder
                      else RandomSource(spec, self.config.model.seed))
            if self._weight_store.fill(source.rows, should_stop=lambda: self._closing):
                log.info("host weight store filled: %.1f MB in %.1f s", self._weight_store.spec.num_bytes / 1e6,
                         time.perf_counter() - started)
        finally:
            finished.set()

    def _bind_inboxes(self) -> None:
        context = self.context
        self._inboxes = {name: Inbox(context, self.address(name)) for name in ("supervisor", "scheduler", "kv-tier")}
        self._inboxes["request-queue"] = Inbox(context, self.request_queue_address)
        self._inboxes["engine"] = Inbox(context, self.reply_address("engine"))

    def _outbox(self, name: str) -> Outbox:
        """A new outbox to one of the head's inboxes, closed with the engine."""
        box = Outbox(self.context, self._inboxes[name].bound_address)
        self._outboxes.append(box)
        return box

    def _send(self, name: str, message) -> None:
        """Send from the engine itself, over one outbox per head inbox."""
        if name not in self._senders:
            self._senders[name] = self._outbox(name)
        self._senders[name].send(message)

    def _wire_actors(self) -> None:
        config, context, parallel = self.config, self.context, self.config.parallel
        inboxes = self._inboxes
        outbox = self._outbox

        request_queue = RequestQueue(
            inboxes["request-queue"], context, outbox("scheduler"), self.codec, self.max_model_len, self.spec.vocab_size,
        )
        if parallel.is_seesaw:
            layouts = {Phase.PREFILL: parallel.prefill_layout, Phase.DECODE: parallel.decode_layout}
        else:
            layouts = {Phase.MIXED: parallel.layout}
        limits = ModelLimits(config.cache.block_size, self.max_model_len, self.spec.eos_token_ids, self.num_host_blocks)
        scheduler = Scheduler(
            inboxes["scheduler"], context, config.scheduler, layouts, limits, outbox("kv-tier"),
            outbox("request-queue"), outbox("supervisor"), outbox("engine"), config.transport.step_timeout_s,
            grammars=None if self.codec.tokenizer is None else Grammars(self.codec.tokenizer, self.spec.vocab_size,
                                                                        self.spec.eos_token_ids),
        )
        kv_tier = KVTier(inboxes["kv-tier"], context, parallel.layout, outbox("scheduler"))
        backend = Backend.NCCL if config.model.device == "cuda" else Backend.GLOO
        supervisor = Supervisor(
            inboxes["supervisor"], context, config.transport, parallel.layouts, backend, self._load_command,
            [outbox("scheduler"), outbox("kv-tier")], outbox("engine"), parallel.local_workers(),
            is_store_pending=self._makes_store, node_memory=self._node_memory_plan(),
        )
        self._actors = [_EngineInbox(inboxes["engine"], self), request_queue, scheduler, kv_tier, supervisor]
        for actor in self._actors:
            actor.start().add_done_callback(self._on_actor_done)

    def _node_memory_plan(self) -> NodeMemoryPlan | None:
        """What keepers make on other nodes; None when every worker runs here."""
        config, parallel = self.config, self.config.parallel
        if parallel.local_workers() >= parallel.layout.world_size:
            return None
        checkpoint = None
        if parallel.reshards:
            folder = str(self.model.weights_folder) if self.model.weights_folder else None
            checkpoint = CheckpointSpec(self.model.hf_config, config.model.resolved_dtype, folder, config.model.seed,
                                        self._feed.address if self._feed else None)
        return NodeMemoryPlan(node_key(socket.gethostname()), self._makes_store,
                              split_host_blocks(self.num_host_blocks, parallel.layout.dp),
                              self._host_block_shape(), config.model.resolved_dtype, checkpoint)

    def _start_feed(self) -> None:
        """Serve the checkpoint to nodes that cannot read its folder, when such nodes may join."""
        parallel = self.config.parallel
        if not parallel.reshards or self.model.weights_folder is None or \
                parallel.local_workers() >= parallel.layout.world_size:
            return
        source = SafetensorsSource(self.model.weights_folder)
        feed = CheckpointFeed(self.context, self.address("checkpoint-feed"), source.rows, self.config.model.resolved_dtype)
        self._feed = _Feed(feed, self._reachable(feed.bound_address))
        feed.start()

    def _load_command(self, rank: int, collective: CollectiveSpec | None, memory: NodeMemoryMade | None) -> LoadShard:
        """A worker's load command; `memory`: its node's keeper's, for a worker on another node."""
        config = self.config
        weight_store = self._weight_store.spec if self._weight_store else None
        host_buffer = self._host_buffer.spec if self._host_buffer else None
        if memory is not None:  # on the head's node a keeper makes no second store
            weight_store, host_buffer = memory.weight_store or weight_store, memory.host_buffer
        return LoadShard(
            hf_config=self.model.hf_config,
            weights_folder=str(self.model.weights_folder) if self.model.weights_folder else None,
            weight_store=weight_store,
            dummy_seed=config.model.seed,
            dtype=config.model.resolved_dtype,
            device=config.model.device,
            layouts=list(config.parallel.layouts),
            rank=rank,
            block_size=config.cache.block_size,
            kv_cache_bytes=config.cache.kv_cache_bytes(config.model.device),
            memory_fraction=config.cache.memory_fraction,
            num_threads=config.parallel.threads(),
            host_buffer=host_buffer,
            collective=collective,
            scheduler_address=self._for_workers("scheduler"),
            kv_tier_address=self._for_workers("kv-tier"),
            join_timeout_s=config.transport.join_timeout_s,
            max_step_tokens=config.scheduler.max_num_batched_tokens,
            max_step_rows=config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
        )

    def _spawn_workers(self) -> None:
        for rank in range(self.config.parallel.local_workers()):
            self._processes[rank] = self._spawn_worker(rank)

    def _spawn_worker(self, rank: int) -> subprocess.Popen:
        threads = str(self.config.parallel.threads())
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        level = logging.getLevelName(logging.getLogger("seesaw").getEffectiveLevel())
        transport = self.config.transport
        options = WorkerOptions(
            head=self._for_workers("supervisor"), rank=rank,
            inbox=f"ipc://{self._run_dir}/worker-{rank}-{len(self._retired)}",
            local_rank=rank,  # the head's own workers are ranks 0 .. n-1 of this host
            heartbeat_s=transport.heartbeat_interval_s, join_timeout_s=transport.join_timeout_s,
            advertise_address=transport.advertise_address, parent_pid=os.getpid(), log_level=level,
        )
        return subprocess.Popen([sys.executable, "-m", "seesaw.worker", options.encode()], env=env)

    def _restart_workers(self, ranks: list[int]) -> None:
        """End these ranks' processes and start new ones once the old are gone (so a new worker finds
        its device free); the Supervisor's restart of a replica."""
        old = {rank: self._processes[rank] for rank in ranks if rank in self._processes}
        for process in old.values():
            if process.poll() is None:
                process.kill()
            self._retired.append(process)
        self._restarts.append(asyncio.get_running_loop().create_task(self._respawn(old)))

    async def _respawn(self, old: dict[int, subprocess.Popen]) -> None:
        for rank, process in old.items():
            try:
                await asyncio.to_thread(process.wait, self.config.transport.shutdown_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not exit after SIGKILL; starting rank %d anyway", process.pid, rank)
            if not self._closing:
                self._processes[rank] = self._spawn_worker(rank)

    # ------------------------------------------------------------ running

    def handle(self, message) -> None:
        match message:
            case EngineReady():
                self.is_ready = True
                self.pin_s = message.pin_s
                self._ready.set()
                self._warn_of_a_small_host_buffer(message.num_device_blocks)
            case EngineFailed():
                self._on_engine_failed(message)
            case RestartWorkers():
                self._restart_workers(message.ranks)
            case StatsReport():
                future = self._stats.pop(message.query_id, None)
                if future is not None and not future.done():
                    future.set_result(message.stats)

    def _warn_of_a_small_host_buffer(self, device_blocks: list[int]) -> None:
        """Seesaw mode: say so when the host buffer holds only a few device pools' worth of KV."""
        if not self.config.parallel.is_seesaw or self._host_buffer is None or not device_blocks:
            return
        host_blocks = self.num_host_blocks // len(device_blocks)
        warning = few_pools_warning(self.host_buffer_plan, host_blocks, min(device_blocks))
        if warning is not None:
            log.warning("%s", warning)

    def _on_engine_failed(self, message: EngineFailed) -> None:
        """The first failure is the engine's: pass it on once; later ones add nothing."""
        if self.failure is not None:
            return
        log.error("the engine failed: %s", message.reason)
        self.failure = message.reason
        self.failed.set()
        for name in ("scheduler", "request-queue"):
            self._send(name, message)

    def _on_actor_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not self._closing:  # handled here: the dead task may be the engine's own inbox
            self._on_engine_failed(EngineFailed(f"{task.get_name()} failed: {error!r}"))

    async def query_stats(self, with_timeline: bool = False, timeout_s: float = 10.0) -> EngineStats:
        """The Scheduler's totals, request counts, KV pool use and phase metrics (see EngineCore.stats),
        with the host buffer plan."""
        query_id = next(self._next_query_ids)
        future = asyncio.get_running_loop().create_future()
        self._stats[query_id] = future
        self._send("scheduler", QueryStats(query_id, self._inboxes["engine"].bound_address, with_timeline))
        try:
            stats = await asyncio.wait_for(future, timeout_s)
            plan = self.host_buffer_plan
            return replace(stats, host_buffer=HostBufferUse(gib=plan.gib, reason=plan.reason, pin_s=self.pin_s))
        except TimeoutError:
            raise EngineError(f"the scheduler did not answer a stats query within {timeout_s:.0f} s") from None
        finally:
            self._stats.pop(query_id, None)

    async def _watch_processes(self) -> None:
        watch = Outbox(self.context, self._inboxes["supervisor"].bound_address)
        self._outboxes.append(watch)
        reported: set[int] = set()  # pids
        while True:
            for rank, process in list(self._processes.items()):
                code = process.poll()
                if code is not None and process.pid not in reported and not self._closing:
                    reported.add(process.pid)
                    watch.send(WorkerFailed(rank, _exit_description(code), None, process.pid))
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------ stop

    async def close(self) -> None:
        """Stop workers (killing any that do not exit in time), actors, sockets and shared memory."""
        self._closing = True
        if self._actors:
            self._send("supervisor", Shutdown())
        for inbox in self._inboxes.values():
            if all(inbox is not actor.inbox for actor in self._actors):
                inbox.close()
        for respawn in self._restarts:
            respawn.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        await self._reap_workers()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for actor in self._actors:
            await actor.stop()
        for box in self._outboxes:
            box.close(linger_s=0)
        if self._feed is not None:
            await self._feed.feed.close()
        if self.context is not None:
            await self._term_context()
        if self._store_filled is not None:  # a start cut short may still be filling it
            await asyncio.to_thread(self._store_filled.wait, self.config.transport.shutdown_timeout_s)
        for segment in (self._host_buffer, self._weight_store):
            if segment is not None:
                segment.close()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            os.close(self._run_dir_lock)
        if self._reaper is not None:
            await asyncio.to_thread(self._reaper.close)

    async def _term_context(self) -> None:
        """End ZeroMQ, but never wait on it for long: a socket left open would block term() forever,
        and shared memory and the run folder must still be removed."""
        ending = threading.Thread(target=self.context.term, name="zmq-term", daemon=True)
        ending.start()
        await asyncio.to_thread(ending.join, self.config.transport.shutdown_timeout_s)
        if ending.is_alive():
            log.warning("a ZeroMQ socket was still open after %.0f s; leaving it to the process exit",
                        self.config.transport.shutdown_timeout_s)

    async def _reap_workers(self) -> None:
        deadline = time.monotonic() + self.config.transport.shutdown_timeout_s
        for process in [*self._processes.values(), *self._retired]:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.to_thread(process.wait, remaining)
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not exit in time; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait, 5.0)

    async def __aenter__(self) -> Engine:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"the process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the process was killed by signal {-code}"
    return f"the process exited with code {code}"
