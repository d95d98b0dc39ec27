"""What each host-buffer block holds as the data plane moved it, and the copies in flight over it
(pure). The scheduling cores decide where a request's KV goes; this index checks each copy
against what the blocks hold, so a wrong plan fails loudly instead of giving a request another's
KV or a half-written block."""

from __future__ import annotations


class HostBlockConflict(RuntimeError):
    """A copy that would read or write host blocks it must not touch."""


class HostBlockIndex:
    """Per host block: the request whose KV was last saved there, the save writing it now, and the
    loads reading it now."""

    def __init__(self):
        self._holders: dict[int, str] = {}  # host block -> the request whose KV it holds
        self._writers: dict[int, str] = {}  # host block -> the request whose save is writing it
        self._readers: dict[int, set[str]] = {}  # host block -> requests whose loads are reading it

    def begin_save(self, request_id: str, host_block_ids: list[int]) -> None:
        """A save of `request_id`'s KV into these blocks starts; none may be in another copy's hands."""
        for block in host_block_ids:
            if block in self._writers:
                raise HostBlockConflict(f"saving request {request_id}'s KV to host block {block}, which "
                                        f"request {self._writers[block]}'s save is still writing")
            if self._readers.get(block):
                raise HostBlockConflict(f"saving request {request_id}'s KV to host block {block}, which "
                                        f"request {sorted(self._readers[block])[0]}'s load is still reading")
        for block in host_block_ids:
            self._writers[block] = request_id
            self._holders.pop(block, None)

    def end_save(self, request_id: str, host_block_ids: list[int], is_done: bool = True) -> None:
        """The save finished (the blocks now hold the request's KV) or was abandoned (they hold nothing)."""
        for block in host_block_ids:
            if self._writers.get(block) == request_id:
                del self._writers[block]
                if is_done:
                    self._holders[block] = request_id

    def begin_load(self, request_id: str, host_block_ids: list[int], shared_holders: list[str] = ()) -> None:
        """A load of `request_id`'s KV from these blocks starts; each must hold that KV, whole: the
        first ones, a prefix it shares, as the saves of `shared_holders` (one per block) wrote them."""
        for index, block in enumerate(host_block_ids):
            if block in self._writers:
                raise HostBlockConflict(f"loading request {request_id}'s KV from host block {block}, which "
                                        f"request {self._writers[block]}'s save is still writing")
            holder = self._holders.get(block)
            expected = shared_holders[index] if index < len(shared_holders) else request_id
            if holder != expected:
                held = "nothing" if holder is None else f"request {holder}'s KV"
                shared = "" if expected == request_id else f" (a prefix it shares, saved by request {expected})"
                raise HostBlockConflict(f"loading request {request_id}'s KV from host block {block}{shared}, "
                                        f"which holds {held}")
        for block in host_block_ids:
            self._readers.setdefault(block, set()).add(request_id)

    def end_load(self, request_id: str, host_block_ids: list[int]) -> None:
        """The load finished or was abandoned."""
        for block in host_block_ids:
            readers = self._readers.get(block)
            if readers is not None:
                readers.discard(request_id)
                if not readers:
                    del self._readers[block]

    def holder(self, host_block_id: int) -> str | None:
        """The request whose KV the block holds (None: nothing whole)."""
        return self._holders.get(host_block_id)
