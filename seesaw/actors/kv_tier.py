"""KVTier actor: moves requests' KV between device blocks and the node's host buffer.

Inbox: SaveKV, LoadKV (Scheduler); SwappedOut, Prefetched (ShardWorker); EngineReady, ReplicaLost,
ReplicaReady (Supervisor).
Sends: SwapOut and Prefetch to every worker of the request's replica; KVSaved and KVLoaded to the
Scheduler once every one of them has moved its share, with the bytes they moved and their time.

The scheduling cores decide which host blocks hold what; this actor fans each move out to the
workers, counts their answers, and keeps the index of what each host block holds as the copies
land (`HostBlockIndex`): a save over blocks another copy is using, or a load of blocks that do not
hold the request's KV whole, is a wrong plan, and ends this actor (so the engine fails, saying
why) rather than giving a request another's KV. It reaches the workers as the Scheduler does
(`ReplicaWorkers`).
"""

from __future__ import annotations

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.actors.replica_workers import ReplicaWorkers
from seesaw.kv.host_index import HostBlockIndex
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
        self.scheduler = scheduler
        self.workers = ReplicaWorkers(self, context, layout)
        self.saving = PendingTransfers()
        self.loading = PendingTransfers()
        self.host = HostBlockIndex()  # what each host block holds, and the copies over it

    def handle(self, message):
        match message:
            case SaveKV():
                self.host.begin_save(message.request_id, message.host_block_ids)
                transfer_id = self.saving.begin(message.request_id, message.replica, message.host_block_ids,
                                                self.workers.ranks(message.replica))
                self.workers.send(message.replica, SwapOut(transfer_id, message.request_id, message.layout,
                                                           message.block_ids, message.host_block_ids))
            case LoadKV():
                self.host.begin_load(message.request_id, message.host_block_ids, message.shared_holders)
                transfer_id = self.loading.begin(message.request_id, message.replica, message.host_block_ids,
                                                 self.workers.ranks(message.replica))
                self.workers.send(message.replica, Prefetch(transfer_id, message.request_id, message.layout,
                                                            message.host_block_ids, message.block_ids))
            case SwappedOut():
                done = self.saving.acknowledge(message.transfer_id, message.rank, message.num_bytes, message.seconds)
                if done is not None:
                    self.host.end_save(done.request_id, done.host_block_ids)
                    self.scheduler.send(KVSaved(done.request_id, done.num_bytes, done.seconds))
            case Prefetched():
                done = self.loading.acknowledge(message.transfer_id, message.rank, message.num_bytes, message.seconds)
                if done is not None:
                    self.host.end_load(done.request_id, done.host_block_ids)
                    self.scheduler.send(KVLoaded(done.request_id, done.num_bytes, done.seconds))
            case EngineReady():
                self.workers.connect_all(message.worker_addresses)
            case ReplicaLost():
                for dropped in self.saving.drop_replica(message.replica):
                    self.host.end_save(dropped.request_id, dropped.host_block_ids, is_done=False)
                for dropped in self.loading.drop_replica(message.replica):
                    self.host.end_load(dropped.request_id, dropped.host_block_ids)
                self.workers.drop(message.replica)
            case ReplicaReady():
                self.workers.connect(message.replica, message.worker_addresses)
