"""ShardWorker actor: one per device, in its own process; runs steps and KV copies for its shard.

Inbox: RankAssigned, MakeNodeMemory, PrepareGroups, LoadShard, HeadAlive, Shutdown (Supervisor);
RunStep, Reshard (Scheduler); SwapOut, Prefetch (KVTier).
Sends: NodeMemoryMade, GroupsPrepared, WorkerReady, WorkerFailed, Heartbeat to the Supervisor;
StepDone, Resharded to the Scheduler; SwappedOut, Prefetched to the KVTier.

Forward passes and transitions run on one dedicated thread, in arrival order, so the inbox keeps
draining while a step computes and a transition starts as soon as this worker's own last step of
the old layout is done; KV copies run on a thread of their own, and so does the wait for each
step's sampled tokens (the step thread starts the next step meanwhile; StepDone keeps step order).
A worker the Supervisor makes its node's keeper (see node_keeper) makes that memory on a thread
of its own too, and removes it when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
from concurrent import futures
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.actors.node_keeper import NodeKeeper
from seesaw.messages import (
    Backend,
    CollectiveSpec,
    GroupSpec,
    GroupsPrepared,
    LoadShard,
    MakeNodeMemory,
    Prefetch,
    Prefetched,
    PrepareGroups,
    RankAssigned,
    Reshard,
    Resharded,
    RunStep,
    Shutdown,
    StepDone,
    SwapOut,
    SwappedOut,
    ToShardWorker,
    WorkerFailed,
    WorkerReady,
)
from seesaw.transport.channels import Inbox, Outbox
from seesaw.transport.addresses import JoinError

log = logging.getLogger(__name__)


class ShardWorker(Actor):
    name = "shard-worker"
    accepts = ToShardWorker

    def __init__(self, inbox: Inbox, rank: int | None, supervisor: Outbox, context: zmq.asyncio.Context,
                 local_rank: int = 0, advertise_ip: str = "127.0.0.1"):
        super().__init__(inbox)
        self.rank = rank
        self.local_rank = local_rank  # which of this host's GPUs is this worker's
        self.advertise_ip = advertise_ip  # this host's address as the other workers reach it
        self.supervisor = supervisor
        self.context = context
        self.scheduler: Outbox | None = None
        self.kv_tier: Outbox | None = None
        self.runtime = None
        self.stopped = asyncio.Event()
        self.has_failed = False
        self.heard_head: float | None = None  # when the head last said anything; None: not yet
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="step")
        self._copies = ThreadPoolExecutor(1, thread_name_prefix="kv-copy")
        self._tokens = ThreadPoolExecutor(1, thread_name_prefix="tokens")  # waits for sampled tokens, in order
        self._memory = ThreadPoolExecutor(1, thread_name_prefix="node-memory")
        self.keeper: NodeKeeper | None = None  # set when this worker keeps its node's shared memory
        self._outstanding: set[Future] = set()

    def handle(self, message):
        # Every command comes from the head's side; HeadAlive says nothing more than that.
        self.heard_head = time.monotonic()
        match message:
            case RankAssigned():
                self.rank = message.rank
            case MakeNodeMemory():
                self._on_make_node_memory(message)
            case PrepareGroups():
                self._on_prepare_groups(message)
            case LoadShard():
                self._on_load_shard(message)
            case RunStep():
                self._on_run_step(message)
            case Reshard():
                self._on_reshard(message)
            case SwapOut():
                self._on_swap_out(message)
            case Prefetch():
                self._on_prefetch(message)
            case Shutdown():
                self.stopped.set()

    def _on_make_node_memory(self, command: MakeNodeMemory) -> None:
        self.keeper = self.keeper or NodeKeeper()
        keeper = self.keeper
        self._submit(self._memory, lambda: keeper.make(command, self.rank, os.getpid()), self.supervisor.send,
                     f"making its node's shared memory for replica {command.replica}")

    def _on_prepare_groups(self, command: PrepareGroups) -> None:
        def prepare() -> GroupsPrepared:
            from seesaw.transport.collective import free_tcp_address, make_nccl_id  # torch, off the loop

            if command.backend == Backend.NCCL:
                groups = [GroupSpec(g.key, g.ranks, make_nccl_id()) for g in command.groups]
                return GroupsPrepared(command.replica, CollectiveSpec(Backend.NCCL, command.world_size, groups,
                                                                      first_rank=command.first_rank), os.getpid())
            return GroupsPrepared(command.replica, CollectiveSpec(Backend.GLOO, command.world_size, command.groups,
                                                                  free_tcp_address(self.advertise_ip),
                                                                  command.first_rank), os.getpid())

        self._submit(self._compute, prepare, self.supervisor.send, "preparing the communicator groups")

    def _on_load_shard(self, command: LoadShard) -> None:
        self.rank = command.rank
        self.scheduler = Outbox(self.context, command.scheduler_address)
        self.kv_tier = Outbox(self.context, command.kv_tier_address)

        def load() -> WorkerReady:
            from seesaw.actors.worker_setup import build_runtime  # torch loads on this thread, not the loop's

            self.runtime = build_runtime(command, self.local_rank)
            device = self.runtime.device
            name = "cpu" if device.type == "cpu" else _cuda_name(device)
            blocks = [self.runtime.num_blocks] * len(command.layouts)
            return WorkerReady(self.rank, blocks, self.runtime.load_s, name, os.getpid(), self.runtime.pin_s)

        self._submit(self._compute, load, self.supervisor.send, "loading its shard of the model")

    def _on_run_step(self, step: RunStep) -> None:
        def run():
            started = time.perf_counter()
            pending = self.runtime.execute(step.rows, step.released)
            return None if pending is None else (pending, started)

        def report(result) -> None:
            # The tokens are awaited on a thread of their own: the step thread starts the next step.
            pending, started = result

            def wait() -> StepDone:
                sampled = pending.wait()
                return StepDone(step.step_id, self.rank, sampled.tokens, (time.perf_counter() - started) * 1000,
                                sampled.logprobs, sampled.prompt_logprobs)

            self._submit(self._tokens, wait, self.scheduler.send, f"reading step {step.step_id}'s tokens")

        self._submit(self._compute, run, report, f"running step {step.step_id}")

    def _on_reshard(self, command: Reshard) -> None:
        arrived = time.perf_counter()

        def reshard() -> Resharded:
            drain_s = time.perf_counter() - arrived
            load_s, num_bytes = self.runtime.reshard(command.layout)
            return Resharded(self.rank, command.layout, drain_s, load_s, num_bytes)

        self._submit(self._compute, reshard, self.scheduler.send, f"re-sharding to {command.layout}")

    def _on_swap_out(self, command: SwapOut) -> None:
        def copy() -> SwappedOut:
            started = time.perf_counter()
            num_bytes = self.runtime.swap_out(command.layout, command.block_ids, command.host_block_ids)
            return SwappedOut(command.transfer_id, command.request_id, self.rank, num_bytes,
                              time.perf_counter() - started)

        self._submit(self._copies, copy, self.kv_tier.send, f"swapping out request {command.request_id}")

    def _on_prefetch(self, command: Prefetch) -> None:
        def copy() -> Prefetched:
            started = time.perf_counter()
            num_bytes = self.runtime.prefetch(command.layout, command.host_block_ids, command.block_ids)
            return Prefetched(command.transfer_id, command.request_id, self.rank, num_bytes,
                              time.perf_counter() - started)

        self._submit(self._copies, copy, self.kv_tier.send, f"prefetching request {command.request_id}")

    def _submit(self, executor: ThreadPoolExecutor, work, deliver: Callable, activity: str) -> None:
        """Run `work` on `executor`, its thread bound to this worker's device; its result, unless None,
        goes to `deliver` on the event loop."""
        loop = asyncio.get_running_loop()

        def on_this_workers_device():
            if self.runtime is not None:  # loading binds the step thread itself
                self.runtime.bind_thread()
            return work()

        try:
            future: Future = executor.submit(on_this_workers_device)
        except RuntimeError:  # the worker is stopping and its executors take no more work
            log.debug("rank %d is stopping: not %s", self.rank, activity)
            return
        self._outstanding.add(future)

        def done(finished: Future) -> None:
            self._outstanding.discard(finished)
            if finished.cancelled():
                return
            error = finished.exception()
            if error is not None:
                detail = "".join(traceback.format_exception_only(type(error), error)).strip()
                if isinstance(error, JoinError):  # says what went wrong and what to try: no stack trace
                    detail = str(error)
                    log.error("%s", detail)
                else:
                    log.error("rank %d failed while %s:\n%s", self.rank, activity,
                              "".join(traceback.format_exception(error)))
                self.supervisor.send(WorkerFailed(self.rank, detail, activity, os.getpid()))
                self.has_failed = True
                self.stopped.set()
                return
            reply = finished.result()
            if reply is not None:
                deliver(reply)

        future.add_done_callback(lambda finished: loop.call_soon_threadsafe(done, finished))

    async def stop(self, timeout_s: float = 5.0) -> None:
        await super().stop()
        if self.keeper is not None:
            self.keeper.stop_filling()
        for executor in (self._compute, self._copies, self._tokens, self._memory):
            executor.shutdown(wait=False, cancel_futures=True)
        # Release the model only once no step or copy still uses it; a step stuck in a collective
        # whose peer died is left to the process exit.
        _, running = await asyncio.to_thread(futures.wait, list(self._outstanding), timeout_s)
        if self.runtime is not None and not running:
            self.runtime.close()
        if self.keeper is not None:  # removed in any case: a mapping still in use stays until the exit
            self.keeper.close()
        for outbox in (self.scheduler, self.kv_tier):
            if outbox is not None:
                outbox.close()


def _cuda_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)
