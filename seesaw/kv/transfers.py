"""Counting a transfer's acknowledgements: done once every worker has moved its share (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Transfer:
    """One request's KV moving on every worker of a replica."""

    request_id: str
    replica: int
    host_block_ids: list[int]
    waiting: set[int] = field(default_factory=set)  # ranks yet to answer
    num_bytes: int = 0  # moved so far, summed over the workers that answered
    seconds: float = 0.0  # their copy threads' time, summed


class PendingTransfers:
    """Outstanding transfers by id; an answer for a transfer that is no longer pending (a worker
    of a replica that was restarted since) is recognised and ignored."""

    def __init__(self):
        self._transfers: dict[int, Transfer] = {}
        self._next_id = 0

    def begin(self, request_id: str, replica: int, host_block_ids: list[int], ranks: list[int]) -> int:
        """Record a new transfer; returns its id, which the workers' answers carry."""
        transfer_id = self._next_id
        self._next_id += 1
        self._transfers[transfer_id] = Transfer(request_id, replica, host_block_ids, set(ranks))
        return transfer_id

    def acknowledge(self, transfer_id: int, rank: int, num_bytes: int = 0, seconds: float = 0.0) -> Transfer | None:
        """Record one worker's part; the whole transfer when this completes it."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None or rank not in transfer.waiting:
            return None
        transfer.waiting.discard(rank)
        transfer.num_bytes += num_bytes
        transfer.seconds += seconds
        if transfer.waiting:
            return None
        del self._transfers[transfer_id]
        return transfer

    def drop_replica(self, replica: int) -> list[Transfer]:
        """Forget a lost replica's transfers (their answers will not come, or no longer count); returns them."""
        dropped = [t for t in self._transfers.values() if t.replica == replica]
        self._transfers = {tid: t for tid, t in self._transfers.items() if t.replica != replica}
        return dropped

    def __len__(self) -> int:
        return len(self._transfers)
