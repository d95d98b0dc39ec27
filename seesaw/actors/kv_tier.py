"""KVTier actor: owns the node's host KV buffer and moves requests' KV between it and the devices.

Inbox: Evict, Restore, DropHostCopy (Scheduler); SwappedOut, Prefetched (ShardWorker);
EngineReady (Supervisor).
Sends: SwapOut and Prefetch to every worker of the request's replica; Evicted and Restored to
the Scheduler.
"""

from __future__ import annotations

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.kv.host_slots import HostSlots
from seesaw.kv.transfers import PendingTransfers
from seesaw.layout import Layout
from seesaw.messages import (
    DropHostCopy,
    EngineReady,
    Evict,
    Evicted,
    Prefetch,
    Prefetched,
    Restore,
    Restored,
    SwapOut,
    SwappedOut,
)
from seesaw.transport.channels import Inbox, Outbox


class KVTier(Actor):
    name = "kv-tier"

    def __init__(self, inbox: Inbox, context: zmq.asyncio.Context, layout: Layout, slots: HostSlots,
                 scheduler: Outbox):
        super().__init__(inbox)
        self.context = context
        self.layout = layout
        self.slots = slots
        self.scheduler = scheduler
        self.workers: list[list[tuple[int, Outbox]]] = []  # (rank, outbox) of each replica
        self.swapping_out = PendingTransfers()
        self.prefetching = PendingTransfers()

    def handle(self, message):
        match message:
            case Evict():
                self._on_evict(message)
            case Restore():
                self._on_restore(message)
            case DropHostCopy():
                self.slots.release(message.request_id)
            case SwappedOut():
                self._on_swapped_out(message)
            case Prefetched():
                self._on_prefetched(message)
            case EngineReady():
                self._on_engine_ready(message)
            case _:
                raise ValueError(f"{self.name} cannot handle {type(message).__name__}")

    def _on_engine_ready(self, message: EngineReady) -> None:
        addresses = message.worker_addresses
        self.workers = [
            [(rank, Outbox(self.context, addresses[rank])) for rank in self.layout.replica_ranks(replica)]
            for replica in range(self.layout.dp)
        ]

    def _on_evict(self, message: Evict) -> None:
        if not self.slots.can_store(message.num_tokens):
            self.scheduler.send(Evicted(message.request_id, is_stored=False, reason="host KV buffer is full"))
            return
        slot = self.slots.store(message.request_id, message.num_tokens)
        workers = self.workers[message.replica]
        self.swapping_out.begin(message.request_id, [rank for rank, _ in workers])
        used_blocks = message.block_ids[: len(slot.host_block_ids)]
        for _, worker in workers:
            worker.send(SwapOut(message.request_id, used_blocks, slot.host_block_ids))

    def _on_swapped_out(self, message: SwappedOut) -> None:
        if self.swapping_out.acknowledge(message.request_id, message.rank):
            self.scheduler.send(Evicted(message.request_id, is_stored=True))

    def _on_restore(self, message: Restore) -> None:
        slot = self.slots.get(message.request_id)
        if slot is None:
            raise ValueError(f"restore of request {message.request_id}, which has no host slot")
        workers = self.workers[message.replica]
        self.prefetching.begin(message.request_id, [rank for rank, _ in workers])
        for _, worker in workers:
            worker.send(Prefetch(message.request_id, slot.host_block_ids, message.block_ids))

    def _on_prefetched(self, message: Prefetched) -> None:
        if self.prefetching.acknowledge(message.request_id, message.rank):
            self.slots.release(message.request_id)
            self.scheduler.send(Restored(message.request_id))

    async def stop(self) -> None:
        await super().stop()
        for workers in self.workers:
            for _, outbox in workers:
                outbox.close(linger_s=0)
