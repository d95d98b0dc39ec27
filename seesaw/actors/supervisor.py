"""Supervisor actor: gathers the world of workers, has each replica form its groups and load its
shards, watches the workers, and when one is lost restarts its replica (within a budget) or fails
the engine loudly.

Workers on a node other than the head's cannot reach the head's shared memory: the lowest rank
there becomes its node's keeper and makes the node's weight store and each of its replicas' host
buffers (MakeNodeMemory) before those replicas form their groups. In seesaw mode a replica must
run on one node (its KV re-shards through its node's host buffer); one that spans nodes is refused.

Inbox: WorkerHello, NodeMemoryMade, GroupsPrepared, WorkerReady, WorkerFailed, Heartbeat (ShardWorker,
or the engine's process watch); WorkersBusy (Scheduler); WeightsStored and Shutdown (Engine).
Sends: RankAssigned, MakeNodeMemory, PrepareGroups, LoadShard, HeadAlive and Shutdown to workers; EngineReady,
ReplicaLost and ReplicaReady to the Scheduler and the KVTier (EngineReady to the Engine too);
RestartWorkers and EngineFailed to the Engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.actors.node_memory import NodeMemoryBook, NodeMemoryPlan
from seesaw.config import TransportConfig
from seesaw.layout import Layout, groups_of
from seesaw.messages import (
    CollectiveSpec,
    EngineFailed,
    EngineReady,
    GroupSpec,
    GroupsPrepared,
    HeadAlive,
    Heartbeat,
    LoadShard,
    NodeMemoryMade,
    PrepareGroups,
    RankAssigned,
    ReplicaLost,
    ReplicaReady,
    RestartWorkers,
    Shutdown,
    ToSupervisor,
    WeightsStored,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
    WorkersBusy,
)
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)

LoadCommand = Callable[[int, CollectiveSpec | None, NodeMemoryMade | None], LoadShard]


def choose_rank(free: list[int], units: list[list[int]], nodes: dict[int, str], node: str) -> int:
    """The rank for a worker that joins without one, from `node`: the first free rank of a unit
    (a rank set that must stay on one node) this node's workers hold already; else the first rank
    of the last unit nobody holds (workers that join take the highest ranks, the head's own are
    numbered from 0); else the highest free rank."""
    waiting = set(free)
    for unit in units:
        if any(nodes.get(rank) == node for rank in unit):
            started = [rank for rank in unit if rank in waiting]
            if started:
                return started[0]
    untouched = [unit for unit in units if all(rank in waiting for rank in unit)]
    return untouched[-1][0] if untouched else free[-1]


class Supervisor(Actor):
    name = "supervisor"
    accepts = ToSupervisor
    FAILURE_GRACE_S = 1.0

    def __init__(
        self,
        inbox: Inbox,
        context: zmq.asyncio.Context,
        config: TransportConfig,
        layouts: list[Layout],  # the run's layouts (same world and replicas), the starting one first
        backend: str,  # "gloo" or "nccl"
        load_command: LoadCommand,
        listeners: list[Outbox],  # Scheduler and KVTier: told when the engine or a replica is ready or lost
        engine: Outbox,
        num_local_workers: int,  # ranks below this are the head's own processes, which it can restart
        is_store_pending: bool = False,  # workers may load only once WeightsStored arrives
        node_memory: NodeMemoryPlan | None = None,  # None: every worker uses the head's memory (or none)
    ):
        super().__init__(inbox)
        self.context = context
        self.config = config
        self.layouts = layouts
        self.layout = layout = layouts[0]
        self.backend = backend
        self.load_command = load_command
        self.listeners = listeners
        self.engine = engine
        self.num_local_workers = num_local_workers
        self.is_store_pending = is_store_pending
        self.node_memory = (NodeMemoryBook(node_memory, layout, num_local_workers)
                            if node_memory is not None and node_memory.is_needed else None)
        world = layout.world_size
        self.workers: list[Outbox | None] = [None] * world
        self.pids: dict[int, int] = {}  # rank -> the pid of its current process
        self.nodes: dict[int, str] = {}  # rank -> the node its current process runs on
        self.ready: dict[int, WorkerReady] = {}
        self.activity: dict[int, str] = {rank: "starting" for rank in range(world)}
        self.last_seen: dict[int, float] = {}
        self.is_engine_ready = False
        self.num_restarts = 0
        self.failed: str | None = None
        self._failures: list[WorkerFailed] = []
        self._verdict: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._waiting_replicas: list[int] = []  # joined, waiting for the weight store
        self._start_deadline: asyncio.TimerHandle | None = None
        self._join_deadline: asyncio.TimerHandle | None = None
        self._report: asyncio.TimerHandle | None = None
        self._restart_deadlines: dict[int, asyncio.TimerHandle] = {}
        self._replaced: set[int] = set()  # pids of processes a restart ended
        self._gone: set[int] = set()  # replicas of other hosts' workers lost, until those join again

    @property
    def addresses(self) -> list[str | None]:
        """Each rank's inbox, None until that worker joins."""
        return [worker.address if worker is not None else None for worker in self.workers]

    def handle(self, message):
        match message:
            case WorkerHello():
                self._on_worker_hello(message)
            case NodeMemoryMade():
                if self._is_current(message.rank, message.pid):
                    self._on_node_memory_made(message)
            case GroupsPrepared():
                if self._is_current(self.layout.replica_ranks(message.replica)[0], message.pid):
                    self._load_replica(message.replica, message.collective)
            case WorkerReady():
                if self._is_current(message.rank, message.pid):
                    self._on_worker_ready(message)
            case WorkerFailed():
                self._on_worker_failed(message)
            case Heartbeat():
                if message.rank in self.last_seen:  # only workers that joined are watched
                    self.last_seen[message.rank] = time.monotonic()
            case WorkersBusy():
                for rank in message.ranks:
                    self.activity[rank] = message.activity
            case WeightsStored():
                self.is_store_pending = False
                waiting, self._waiting_replicas = self._waiting_replicas, []
                for replica in waiting:
                    self._prepare_groups(replica)
            case Shutdown():
                self._shutdown_workers()

    REPORT_EVERY_S = 10.0

    def start(self) -> asyncio.Task:
        """Start; fail the engine unless every worker joins within the join timeout and is ready
        within the start timeout, and say every ten seconds which workers it still waits for."""
        task = super().start()
        loop = asyncio.get_running_loop()
        timeout_s = self.config.worker_start_timeout_s
        self._start_deadline = loop.call_later(timeout_s, self._start_timed_out, timeout_s)
        self._join_deadline = loop.call_later(self.config.join_timeout_s, self._join_timed_out)
        self._report = loop.call_later(self.REPORT_EVERY_S, self._report_waiting)
        return task

    def _missing(self) -> list[int]:
        return [rank for rank, address in enumerate(self.addresses) if address is None]

    def _report_waiting(self) -> None:
        missing = self._missing()
        if missing and self.failed is None:
            log.warning("waiting for %d of %d workers at %s (ranks %s have not joined)", len(missing),
                        self.layout.world_size, self.inbox.bound_address, ", ".join(map(str, missing)))
            self._report = asyncio.get_running_loop().call_later(self.REPORT_EVERY_S, self._report_waiting)

    def _join_timed_out(self) -> None:
        """The start's deadline for joining; a replica lost later waits for its workers without one
        (its requests run elsewhere meanwhile)."""
        missing = self._missing()
        if missing and not self.is_engine_ready:
            self._fail_engine(
                f"{len(missing)} of {self.layout.world_size} workers did not join within "
                f"{self.config.join_timeout_s:.0f} s (ranks {', '.join(map(str, missing))}): start them with "
                f"`seesaw-cli worker --head {self.inbox.bound_address}` and check that their hosts reach that "
                f"address (the head's --head-address, or --advertise-address when it binds a wildcard)")

    def _start_timed_out(self, timeout_s: float) -> None:
        joined = sum(address is not None for address in self.addresses)
        self._fail_engine(f"workers were not ready within {timeout_s:.0f} s "
                          f"({joined} of {self.layout.world_size} joined, {len(self.ready)} loaded)")

    def _is_current(self, rank: int, pid: int | None) -> bool:
        """Whether a report comes from the rank's present process, not one a restart replaced."""
        return self.pids.get(rank) == pid

    # ------------------------------------------------------------ joining and loading

    def _on_worker_hello(self, message: WorkerHello) -> None:
        rank = message.rank
        if rank is not None and rank >= self.layout.world_size:
            log.warning("worker pid %d on %s asked for rank %d, but %s has %d workers; sending it away",
                        message.pid, message.hostname, rank, self.layout, self.layout.world_size)
            self._send_away(message.inbox)
            return
        if rank is None:
            # The head's own workers come with their ranks, from 0: those stay theirs.
            free = [r for r, address in enumerate(self.addresses) if address is None and r >= self.num_local_workers]
            if not free:
                log.warning("worker pid %d on %s joined a full world; sending it away", message.pid, message.hostname)
                self._send_away(message.inbox)
                return
            rank = choose_rank(free, self._units(), self.nodes, message.node)
        if self.addresses[rank] is not None:
            log.warning("a second worker claims rank %d; sending pid %d away", rank, message.pid)
            self._send_away(message.inbox)
            return
        log.info("worker %d is up (pid %d on %s, %s)", rank, message.pid, message.hostname, message.inbox)
        self.workers[rank] = self.connect(self.context, message.inbox)
        self.pids[rank] = message.pid
        self.nodes[rank] = message.node or f"pid {message.pid}"
        if message.rank is None:
            self.workers[rank].send(RankAssigned(rank))
        self.last_seen[rank] = time.monotonic()
        self.activity[rank] = "waiting for the other workers"
        self._arm_watch()
        if not self._missing() and self._join_deadline is not None:
            self._join_deadline.cancel()  # the world is whole: joining is done
            self._join_deadline = None
        replica = self.layout.coordinates(rank)[0]
        if all(self.workers[r] is not None for r in self.layout.replica_ranks(replica)):
            self._replica_joined(replica)

    def _units(self) -> list[list[int]]:
        """The rank sets that must each run on one node: a replica in seesaw mode (it re-shards
        through its node's shared memory), else a tensor-parallel group (it all-reduces every layer)."""
        layout = self.layout
        if len(self.layouts) > 1:
            return [list(layout.replica_ranks(replica)) for replica in range(layout.dp)]
        return [layout.tp_group(rank) for rank in range(0, layout.world_size, layout.tp)]

    def _send_away(self, address: str) -> None:
        outbox = Outbox(self.context, address)
        outbox.send(Shutdown())
        outbox.close()

    def _replica_joined(self, replica: int) -> None:
        ranks = self.layout.replica_ranks(replica)
        nodes = {self.nodes[rank] for rank in ranks}
        if len(self.layouts) > 1 and len(nodes) > 1:
            where = "; ".join(f"{node}: ranks {', '.join(str(r) for r in ranks if self.nodes[r] == node)}"
                              for node in sorted(nodes))
            self._fail_engine(
                f"replica {replica} of {self.layout} has workers on {len(nodes)} nodes ({where}). Seesaw mode "
                f"re-shards a replica's KV through its node's shared memory, so each replica's "
                f"{len(ranks)} workers must run on one node: start them in whole replicas per node, or run "
                f"across nodes with --layout")
            return
        asks = [] if self.node_memory is None else \
            self.node_memory.ask(replica, self.nodes, lambda rank: self.workers[rank] is not None)
        for keeper, command in asks:
            log.info("worker %d keeps the shared memory of node %s", keeper, self.nodes[keeper])
            self.activity[keeper] = f"making its node's shared memory for replica {replica}"
            self.workers[keeper].send(command)
        if not asks:
            self._memory_ready(replica)

    def _on_node_memory_made(self, message: NodeMemoryMade) -> None:
        node = self.nodes[message.rank]
        log.info("node %s: shared memory for replica %d ready in %.1f s (weights from %s)", node, message.replica,
                 message.seconds, message.source)
        self.activity[message.rank] = "waiting for its replica's groups"
        if self.node_memory is not None and self.node_memory.made(node, message):
            self._memory_ready(message.replica)

    def _memory_ready(self, replica: int) -> None:
        if self.is_store_pending:
            self._waiting_replicas.append(replica)  # the workers are still watched meanwhile
            return
        self._prepare_groups(replica)

    def _prepare_groups(self, replica: int) -> None:
        groups = [GroupSpec(key, ranks) for key, ranks in groups_of(self.layouts, replica)]
        ranks = self.layout.replica_ranks(replica)
        if not groups:  # every worker alone in every group: nothing to communicate
            self._load_replica(replica, None)
            return
        self.workers[ranks[0]].send(PrepareGroups(replica, self.backend, len(ranks), ranks[0], groups))

    def _load_replica(self, replica: int, collective: CollectiveSpec | None) -> None:
        for rank in self.layout.replica_ranks(replica):
            self.activity[rank] = "loading its shard of the model"
            memory = None if self.node_memory is None else self.node_memory.memory(self.nodes[rank], replica)
            self.workers[rank].send(self.load_command(rank, collective, memory))

    def _on_worker_ready(self, message: WorkerReady) -> None:
        log.info(
            "worker %d ready on %s in %.1f s: %s KV blocks",
            message.rank, message.device_name, message.load_s, message.num_device_blocks,
        )
        self.ready[message.rank] = message
        self.activity[message.rank] = "running steps"
        replica = self.layout.coordinates(message.rank)[0]
        ranks = self.layout.replica_ranks(replica)
        if any(rank not in self.ready for rank in ranks):
            return
        if self.is_engine_ready:
            self._replica_restarted(replica)
            return
        if len(self.ready) < self.layout.world_size:
            return
        self.is_engine_ready = True
        if self._start_deadline is not None:
            self._start_deadline.cancel()
        blocks = [self._replica_blocks(r) for r in range(self.layout.dp)]
        pin_s = max(ready.pin_s for ready in self.ready.values())
        for listener in [*self.listeners, self.engine]:
            listener.send(EngineReady(blocks, list(self.addresses), pin_s))

    def _replica_blocks(self, replica: int) -> int:
        return min(min(self.ready[rank].num_device_blocks) for rank in self.layout.replica_ranks(replica))

    # ------------------------------------------------------------ failures and restarts

    def _on_worker_failed(self, message: WorkerFailed) -> None:
        if self.failed is not None or message.pid in self._replaced:
            return  # the engine is down already, or this is a process a restart has replaced
        if message.rank is None:  # a worker that never heard its rank: name it by its process
            rank = next((r for r, pid in self.pids.items() if pid == message.pid), None)
            if rank is None:
                self._fail_engine(f"a worker (pid {message.pid}) failed while {message.activity}: {message.error}")
                return
            message = dataclasses.replace(message, rank=rank)
        # A worker that dies takes its peers' collectives down with it; wait a moment so the
        # report names the worker that died, not a peer that noticed first.
        self._failures.append(message)
        if self._verdict is None:
            self._verdict = asyncio.get_running_loop().call_later(self.FAILURE_GRACE_S, self._judge_failures)

    def _judge_failures(self) -> None:
        self._verdict = None
        failures, self._failures = self._failures, []
        spoke = {f.rank for f in failures if f.activity}
        silent_deaths = [f for f in failures if not f.activity and f.rank not in spoke]
        first = (silent_deaths or failures)[0]
        doing = first.activity or self.activity.get(first.rank, "unknown")
        reason = f"worker {first.rank} failed while {doing}: {first.error}"
        replicas = sorted({self.layout.coordinates(f.rank)[0] for f in failures})
        if not self.is_engine_ready:
            self._fail_engine(reason)
        elif self.num_restarts + len(replicas) > self.config.max_restarts:
            self._fail_engine(f"{reason} (restarts used: {self.num_restarts} of {self.config.max_restarts}, "
                              f"--max-restarts)")
        else:
            remote = [replica for replica in replicas if max(self.layout.replica_ranks(replica)) >= self.num_local_workers]
            if remote and not set(range(self.layout.dp)) - self._gone - set(remote):
                self._fail_engine(f"{reason} (its replica has workers on other hosts, which this host cannot "
                                  f"restart, and no other replica is left)")
                return
            local = [r for replica in replicas if replica not in remote for r in self.layout.replica_ranks(replica)]
            if local:
                self.engine.send(RestartWorkers(local))
            for replica in replicas:
                self._replica_lost(replica, reason, is_gone=replica in remote)

    def _replica_lost(self, replica: int, reason: str, is_gone: bool = False) -> None:
        """Restart a replica of the head's own workers; one with workers on other hosts is gone
        (its surviving workers are sent away) until its workers join again."""
        self.num_restarts += 1
        if is_gone:
            log.error("%s; replica %d has workers on other hosts, which this host cannot restart: its requests "
                      "go on on the other replicas, and it comes back if its workers join again (loss %d of %d)",
                      reason, replica, self.num_restarts, self.config.max_restarts)
        else:
            log.error("%s; restarting replica %d (restart %d of %d)", reason, replica, self.num_restarts,
                      self.config.max_restarts)
        for listener in self.listeners:
            listener.send(ReplicaLost(replica, reason, is_gone))
        if self.node_memory is not None:
            self.node_memory.lost(replica)
        for rank in self.layout.replica_ranks(replica):
            if self.workers[rank] is not None:
                if is_gone:
                    self.workers[rank].send(Shutdown())  # a peer still alive would wait on the dead one
                self.disconnect(self.workers[rank])
            self.workers[rank] = None
            pid = self.pids.pop(rank, None)
            self.nodes.pop(rank, None)
            if pid is not None:
                self._replaced.add(pid)
            self.ready.pop(rank, None)
            self.last_seen.pop(rank, None)
            self.activity[rank] = f"restarting after: {reason}"
        earlier = self._restart_deadlines.pop(replica, None)
        if earlier is not None:  # a second loss while it was restarting
            earlier.cancel()
        if is_gone:
            self._gone.add(replica)
            return
        timeout_s = self.config.worker_start_timeout_s
        self._restart_deadlines[replica] = asyncio.get_running_loop().call_later(
            timeout_s, self._fail_engine, f"replica {replica} did not come back within {timeout_s:.0f} s of a restart"
        )

    def _replica_restarted(self, replica: int) -> None:
        self._gone.discard(replica)
        deadline = self._restart_deadlines.pop(replica, None)
        if deadline is not None:
            deadline.cancel()
        log.info("replica %d is back", replica)
        ranks = self.layout.replica_ranks(replica)
        for listener in self.listeners:
            listener.send(ReplicaReady(replica, self._replica_blocks(replica), [self.addresses[r] for r in ranks]))

    def _fail_engine(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        log.error("%s", reason)
        self.engine.send(EngineFailed(reason))

    def _arm_watch(self) -> None:
        if self._watch is None:
            interval_s = min(1.0, self.config.heartbeat_timeout_s / 4)
            self._watch = asyncio.get_running_loop().call_later(interval_s, self._check_heartbeats)

    def _check_heartbeats(self) -> None:
        self._watch = None
        for worker in self.workers:
            if worker is not None:
                worker.send(HeadAlive())
        now = time.monotonic()
        for rank, seen in list(self.last_seen.items()):
            if now - seen > self.config.heartbeat_timeout_s and self.failed is None:
                self._on_worker_failed(WorkerFailed(
                    rank, f"no heartbeat for {now - seen:.0f} s", self.activity.get(rank, "unknown"),
                    self.pids.get(rank),
                ))
                self.last_seen.pop(rank, None)  # reported once
        if self.failed is None:
            self._arm_watch()

    def _shutdown_workers(self) -> None:
        for worker in self.workers:
            if worker is not None:
                worker.send(Shutdown())

    async def stop(self) -> None:
        for timer in (self._watch, self._verdict, self._start_deadline, self._join_deadline, self._report,
                      *self._restart_deadlines.values()):
            if timer is not None:
                timer.cancel()
        # Workers on other hosts are not the head's to reap: make sure they hear Shutdown, and
        # give it a moment to go out (closing an owned outbox at stop drops what it holds).
        self._shutdown_workers()
        for rank, worker in enumerate(self.workers):
            if worker is not None:
                self.disconnect(worker)
                self.workers[rank] = None
        await super().stop()
