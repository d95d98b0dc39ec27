"""The outboxes an actor keeps to each data-parallel replica's workers (the Scheduler's and the
KVTier's): all made once the engine is ready, a replica's closed when it is lost and made again
when it is back."""

from __future__ import annotations

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.layout import Layout
from seesaw.transport.channels import Outbox


class ReplicaWorkers:
    """Outboxes to each replica's workers, in rank order, owned by `actor` (closed when it stops)."""

    def __init__(self, actor: Actor, context: zmq.asyncio.Context, layout: Layout):
        self.actor = actor
        self.context = context
        self.layout = layout
        self._outboxes: list[list[Outbox]] = [[] for _ in range(layout.dp)]

    def connect_all(self, addresses: list[str]) -> None:
        """Reach every replica's workers (`addresses` by global rank)."""
        for replica in range(self.layout.dp):
            self.connect(replica, [addresses[rank] for rank in self.layout.replica_ranks(replica)])

    def connect(self, replica: int, addresses: list[str]) -> None:
        """Reach one replica's workers (`addresses` in its rank order), dropping any older outboxes to it."""
        self.drop(replica)
        self._outboxes[replica] = [self.actor.connect(self.context, address) for address in addresses]

    def drop(self, replica: int) -> None:
        """Close the outboxes to a replica that is gone."""
        for outbox in self._outboxes[replica]:
            self.actor.disconnect(outbox)
        self._outboxes[replica] = []

    def ranks(self, replica: int) -> list[int]:
        """The global ranks this actor reaches in a replica (none while it is gone)."""
        return list(self.layout.replica_ranks(replica)) if self._outboxes[replica] else []

    def send(self, replica: int, command) -> None:
        """The same command to every worker of a replica."""
        for outbox in self._outboxes[replica]:
            outbox.send(command)
