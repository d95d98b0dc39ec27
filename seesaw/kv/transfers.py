"""Counting a transfer's acknowledgements: done once every worker has moved its shard (pure)."""

from __future__ import annotations


class PendingTransfers:
    """Outstanding per-request transfers, each waiting on a set of worker ranks."""

    def __init__(self):
        self._waiting: dict[str, set[int]] = {}

    def begin(self, request_id: str, ranks: list[int]) -> None:
        if request_id in self._waiting:
            raise ValueError(f"request {request_id} already has a transfer in progress")
        self._waiting[request_id] = set(ranks)

    def acknowledge(self, request_id: str, rank: int) -> bool:
        """Record one worker's part; True when this completes the transfer."""
        waiting = self._waiting.get(request_id)
        if waiting is None or rank not in waiting:
            raise ValueError(f"unexpected acknowledgement from rank {rank} for request {request_id}")
        waiting.discard(rank)
        if waiting:
            return False
        del self._waiting[request_id]
        return True

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting
