"""The Supervisor's book of node memory (pure): which worker keeps each node's shared memory, what
each replica waits for before it forms its groups, and what each made. No I/O: the Supervisor
sends the commands it returns and reports what arrives."""

from __future__ import annotations

from dataclasses import dataclass

from seesaw.layout import Layout
from seesaw.messages import CheckpointSpec, MakeNodeMemory, NodeMemoryMade


@dataclass(frozen=True)
class NodeMemoryPlan:
    """What a keeper makes on a node other than the head's: each replica's host blocks (as the
    engine numbers them; none when the run has no host buffer) and, when the run re-shards, the
    weight store from `checkpoint`."""

    head_node: str  # the head's node key: its own workers use its memory
    head_has_store: bool  # whether the head made a weight store, which its node's keeper then need not
    host_blocks: list[tuple[int, int]]  # by replica: (first block, count)
    block_shape: list[int]
    dtype: str
    checkpoint: CheckpointSpec | None

    @property
    def is_needed(self) -> bool:
        return self.checkpoint is not None or any(count for _, count in self.host_blocks)


class NodeMemoryBook:
    """Replicas whose workers use the head's memory need nothing here; any other replica's workers
    on a node wait for that node's keeper (the lowest rank that joined there, while it lives)."""

    def __init__(self, plan: NodeMemoryPlan, layout: Layout, num_local_workers: int):
        self.plan = plan
        self.layout = layout
        self.num_local_workers = num_local_workers
        self.keepers: dict[str, int] = {}  # node -> the rank keeping its shared memory
        self._made: dict[tuple[str, int], NodeMemoryMade] = {}  # (node, replica) -> its memory there
        self._awaited: dict[int, set[str]] = {}  # replica -> the nodes whose keepers it waits for

    def ask(self, replica: int, nodes: dict[int, str], is_up) -> list[tuple[int, MakeNodeMemory]]:
        """What to ask, of which keeper, for a replica whose workers have all joined (`nodes`: each
        rank's node; `is_up(rank)`: whether a rank's worker is joined); empty when it needs nothing."""
        ranks = self.layout.replica_ranks(replica)
        awaited = {nodes[rank] for rank in ranks if self._needs_keeper(replica, nodes[rank])}
        asks = []
        for node in sorted(awaited):
            keeper = self.keepers.get(node)
            if keeper is None or not is_up(keeper):
                keeper = self.keepers[node] = min(rank for rank in ranks if nodes[rank] == node)
            asks.append((keeper, self._command(replica, node)))
        if awaited:
            self._awaited[replica] = awaited
        return asks

    def _needs_keeper(self, replica: int, node: str) -> bool:
        """The head's own workers, and those beside them on its node, use the head's memory."""
        if (node, replica) in self._made:
            return False
        return node != self.plan.head_node or min(self.layout.replica_ranks(replica)) >= self.num_local_workers

    def _command(self, replica: int, node: str) -> MakeNodeMemory:
        plan = self.plan
        first, count = plan.host_blocks[replica] if plan.host_blocks else (0, 0)
        checkpoint = None if node == plan.head_node and plan.head_has_store else plan.checkpoint
        return MakeNodeMemory(replica, first, count, plan.block_shape, plan.dtype, checkpoint)

    def made(self, node: str, message: NodeMemoryMade) -> bool:
        """Record what a keeper made; True when its replica now has every node's memory it waited for."""
        self._made[node, message.replica] = message
        awaited = self._awaited.get(message.replica)
        if awaited is None:
            return False
        awaited.discard(node)
        if awaited:
            return False
        del self._awaited[message.replica]
        return True

    def memory(self, node: str, replica: int) -> NodeMemoryMade | None:
        """The memory a keeper made for the replica's workers on `node`; None: the head's."""
        return self._made.get((node, replica))

    def lost(self, replica: int) -> None:
        """The replica is gone: it waits for nothing, and a keeper among its workers took its node's
        memory with it (the node's other replicas keep their mappings)."""
        self._awaited.pop(replica, None)
        ranks = self.layout.replica_ranks(replica)
        for node, keeper in list(self.keepers.items()):
            if keeper in ranks:
                del self.keepers[node]
                for key in [key for key in self._made if key[0] == node]:
                    del self._made[key]
