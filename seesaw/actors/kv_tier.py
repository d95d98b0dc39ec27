"""KVTier actor: moves requests' KV between device blocks and the node's host buffer.

Inbox: SaveKV, LoadKV (Scheduler); SwappedOut, Prefetched (ShardWorker); EngineReady, ReplicaLost,
ReplicaReady (Supervisor).
Sends: SwapOut and Prefetch to every worker of the request's replica; KVSaved and KVLoaded to the
Scheduler once every one of them has moved its share.

The scheduling cores decide which host blocks hold what; this actor fans each move out to the
workers, counts their answers, and keeps the totals of bytes moved and time spent.
"""

from __future__ import annotations

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.kv.transfers import PendingTransfers
from seesaw.layout import Layout
from seesaw.messages import (
    EngineReady,
    KVLoaded,
    KVSaved,
    LoadKV,
    Prefetch,
    Prefetched,
    ReplicaLost,
    ReplicaReady,
    SaveKV,
    SwapOut,
    SwappedOut,
)
from seesaw.transport.channels import Inbox, Outbox


class KVTier(Actor):
    name = "kv-tier"

    def __init__(self, inbox: Inbox, context: zmq.asyncio.Context, layout: Layout, scheduler: Outbox):
        super().__init__(inbox)
        self.context = context
        self.layout = layout
        self.scheduler = scheduler
        self.workers: list[list[tuple[int, Outbox]]] = []  # (rank, outbox) of each replica
        self.saving = PendingTransfers()
        self.loading = PendingTransfers()
        # Bytes moved and seconds the workers' copy threads spent, summed over workers.
        self.totals = {"written_bytes": 0, "written_s": 0.0, "read_bytes": 0, "read_s": 0.0}

    def handle(self, message):
        match message:
            case SaveKV():
                transfer_id = self.saving.begin(message.request_id, message.replica, self._ranks(message.replica))
                self._fan_out(message.replica, SwapOut(transfer_id, message.request_id, message.layout,
                                                       message.block_ids, message.host_block_ids))
            case LoadKV():
                transfer_id = self.loading.begin(message.request_id, message.replica, self._ranks(message.replica))
                self._fan_out(message.replica, Prefetch(transfer_id, message.request_id, message.layout,
                                                        message.host_block_ids, message.block_ids))
            case SwappedOut():
                self._count("written", message.num_bytes, message.seconds)
                if self.saving.acknowledge(message.transfer_id, message.rank) is not None:
                    self.scheduler.send(KVSaved(message.request_id))
            case Prefetched():
                self._count("read", message.num_bytes, message.seconds)
                if self.loading.acknowledge(message.transfer_id, message.rank) is not None:
                    self.scheduler.send(KVLoaded(message.request_id))
            case EngineReady():
                self._on_engine_ready(message)
            case ReplicaLost():
                self.saving.drop_replica(message.replica)
                self.loading.drop_replica(message.replica)
            case ReplicaReady():
                self._connect(message.replica, message.worker_addresses)
            case _:
                raise ValueError(f"{self.name} cannot handle {type(message).__name__}")

    def _on_engine_ready(self, message: EngineReady) -> None:
        self.workers = [[] for _ in range(self.layout.dp)]
        for replica in range(self.layout.dp):
            ranks = self.layout.replica_ranks(replica)
            self._connect(replica, [message.worker_addresses[rank] for rank in ranks])

    def _connect(self, replica: int, addresses: list[str]) -> None:
        """Outboxes to a replica's workers (again, after a restart)."""
        for _, outbox in self.workers[replica]:
            outbox.close(linger_s=0)
        ranks = self.layout.replica_ranks(replica)
        self.workers[replica] = [(rank, Outbox(self.context, address)) for rank, address in zip(ranks, addresses)]

    def _ranks(self, replica: int) -> list[int]:
        return [rank for rank, _ in self.workers[replica]]

    def _fan_out(self, replica: int, command) -> None:
        for _, worker in self.workers[replica]:
            worker.send(command)

    def _count(self, direction: str, num_bytes: int, seconds: float) -> None:
        self.totals[f"{direction}_bytes"] += num_bytes
        self.totals[f"{direction}_s"] += seconds

    async def stop(self) -> None:
        await super().stop()
        for workers in self.workers:
            for _, outbox in workers:
                outbox.close(linger_s=0)
