"""A node keeper: the worker that holds its node's shared memory when the head's is out of reach.

On a node other than the head's, the Supervisor picks one worker (the lowest rank there) to
create the node's weight store, filled once from the checkpoint as this host sees it (or from
the head's checkpoint feed when it cannot read the folder), and a host KV buffer for each of the
node's replicas, numbered as the engine numbers host blocks. The keeper owns them: they go when
it exits, however it exits: a reaper process removes what a killed keeper leaves.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from seesaw.messages import CheckpointSpec, MakeNodeMemory, NodeMemoryMade
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import RandomSource, SafetensorsSource, WeightSource, neutral_shapes
from seesaw.transport.checkpoint_feed import FedCheckpoint
from seesaw.transport.host_buffer import HostBuffer
from seesaw.transport.shared_memory import SHM_DIR, Reaper, reclaim_orphans
from seesaw.transport.weight_store import WeightStore

log = logging.getLogger(__name__)


def checkpoint_source(checkpoint: CheckpointSpec, feed_timeout_s: float) -> tuple[WeightSource | FedCheckpoint, str]:
    """What fills the node's store and how to name it: the folder when this host reads it, else
    the head's feed; seeded random weights for a model without a folder."""
    spec = ModelSpec.from_hf_config(checkpoint.hf_config)
    if checkpoint.weights_folder is None:
        return RandomSource(spec, checkpoint.seed), f"seeded random weights (seed {checkpoint.seed})"
    folder = Path(checkpoint.weights_folder)
    try:
        return SafetensorsSource(folder), f"{folder} on this host"
    except (OSError, ValueError) as error:
        if checkpoint.feed_address is None:
            raise ValueError(f"this host cannot read the checkpoint {folder} ({error}) and the head offers "
                             f"no checkpoint feed: make the folder reachable here (a shared file system)") from None
        log.info("this host cannot read %s (%s): filling the weight store from the head", folder, error)
        shapes = neutral_shapes(spec)
        return FedCheckpoint(checkpoint.feed_address, shapes, checkpoint.dtype, feed_timeout_s), \
            f"the head's checkpoint feed at {checkpoint.feed_address}"


class NodeKeeper:
    """The shared memory one keeper holds for its node: one weight store, a host buffer per replica."""

    def __init__(self, feed_timeout_s: float = 120.0):
        self.feed_timeout_s = feed_timeout_s
        self.weight_store: WeightStore | None = None
        self.host_buffers: dict[int, HostBuffer] = {}  # by replica
        self._is_closing = False
        self._reaper: Reaper | None = None

    def make(self, command: MakeNodeMemory, rank: int, pid: int) -> NodeMemoryMade:
        """Create what `command` asks for (the store only once) and say where it is."""
        started = time.perf_counter()
        if self._reaper is None:
            for leftover in reclaim_orphans([SHM_DIR]):
                log.warning("removed %s, left behind by a run that no longer exists", leftover)
            self._reaper = Reaper()
        source = "nothing new"
        if command.checkpoint is not None and self.weight_store is None:
            source = self._make_store(command.checkpoint)
        buffer = self.host_buffers.get(command.replica)
        if buffer is None and command.num_blocks > 0:
            buffer = HostBuffer.create(command.num_blocks, command.block_shape, command.dtype, command.first_block,
                                       self._reaper)
            self.host_buffers[command.replica] = buffer
        return NodeMemoryMade(command.replica, rank, buffer.spec if buffer else None,
                              self.weight_store.spec if self.weight_store else None, source,
                              time.perf_counter() - started, pid)

    def _make_store(self, checkpoint: CheckpointSpec) -> str:
        spec = ModelSpec.from_hf_config(checkpoint.hf_config)
        source, described = checkpoint_source(checkpoint, self.feed_timeout_s)
        started = time.perf_counter()
        store = WeightStore.create(neutral_shapes(spec), checkpoint.dtype, self._reaper)
        self.weight_store = store  # closed with the keeper even if filling fails
        try:
            if not store.fill(source.rows, should_stop=lambda: self._is_closing):
                raise RuntimeError("the worker is stopping: the weight store was left unfilled")
        finally:
            if isinstance(source, FedCheckpoint):
                source.close()
        log.info("node weight store filled from %s: %.1f MB in %.1f s", described, store.spec.num_bytes / 1e6,
                 time.perf_counter() - started)
        return described

    def stop_filling(self) -> None:
        self._is_closing = True

    def close(self) -> None:
        """Unmap and remove everything this keeper made."""
        self._is_closing = True
        for buffer in self.host_buffers.values():
            buffer.close()
        self.host_buffers.clear()
        if self.weight_store is not None:
            self.weight_store.close()
            self.weight_store = None
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
