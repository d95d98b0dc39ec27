"""KVTier actor: moves requests' KV between device blocks and the node's host buffer.

Inbox: SaveKV, LoadKV (Scheduler); SwappedOut, Prefetched (ShardWorker); EngineReady, ReplicaLost,
ReplicaReady (Supervisor).
Sends: SwapOut and Prefetch to every worker of the request's replica; KVSaved and KVLoaded to the
Scheduler once every one of them has moved its share, with the bytes they moved and their time.

The scheduling cores decide which host blocks hold what; this actor fans each move out to the
workers and counts their answers.
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
    ToKVTier,
)
from seesaw.transport.channels import Inbox, Outbox


class KVTier(Actor):
    name = "kv-tier"
    accepts = ToKVTier

    def __init__(self, inbox: Inbox, context: zmq.asyncio.Context, layout: Layout, scheduler: Outbox):
        super().__init__(inbox)
        self.context = context
        self.layout = layout
        self.scheduler = scheduler
        self.workers: list[list[tuple[int, Outbox]]] = []  # (rank, outbox) of each replica
        self.saving = PendingTransfers()
        self.loading = PendingTransfers()

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
                done = self.saving.acknowledge(message.transfer_id, message.rank, message.num_bytes, message.seconds)
                if done is not None:
                    self.scheduler.send(KVSaved(done.request_id, done.num_bytes, done.seconds))
            case Prefetched():
                done = self.loading.acknowledge(message.transfer_id, message.rank, message.num_bytes, message.seconds)
                if done is not None:
                    self.scheduler.send(KVLoaded(done.request_id, done.num_bytes, done.seconds))
            case EngineReady():
                self._on_engine_ready(message)
            case ReplicaLost():
                self.saving.drop_replica(message.replica)
                self.loading.drop_replica(message.replica)
            case ReplicaReady():
                self._connect(message.replica, message.worker_addresses)

    def _on_engine_ready(self, message: EngineReady) -> None:
        self.workers = [[] for _ in range(self.layout.dp)]
        for replica in range(self.layout.dp):
            ranks = self.layout.replica_ranks(replica)
            self._connect(replica, [message.worker_addresses[rank] for rank in ranks])

    def _connect(self, replica: int, addresses: list[str]) -> None:
        """Outboxes to a replica's workers (again, after a restart)."""
        for _, outbox in self.workers[replica]:
            self.disconnect(outbox)
        ranks = self.layout.replica_ranks(replica)
        self.workers[replica] = [(rank, self.connect(self.context, address)) for rank, address in zip(ranks, addresses)]

    def _ranks(self, replica: int) -> list[int]:
        return [rank for rank, _ in self.workers[replica]]

    def _fan_out(self, replica: int, command) -> None:
        for _, worker in self.workers[replica]:
            worker.send(command)

