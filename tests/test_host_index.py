"""The KVTier's index of what each host block holds: copies that would read another request's KV,
or touch a block another copy is using, are refused (the actor's own test is in test_actors.py)."""

from __future__ import annotations

import pytest

from seesaw.kv.host_index import HostBlockConflict, HostBlockIndex


def test_a_block_holds_a_request_s_kv_once_its_save_lands():
    index = HostBlockIndex()
    index.begin_save("a", [0, 1])
    with pytest.raises(HostBlockConflict, match="host block 1, which request a's save is still writing"):
        index.begin_load("a", [1])
    with pytest.raises(HostBlockConflict, match="request a's save is still writing"):
        index.begin_save("b", [1, 2])
    index.end_save("a", [0, 1])
    assert (index.holder(0), index.holder(1), index.holder(2)) == ("a", "a", None)
    index.begin_load("a", [0, 1])
    with pytest.raises(HostBlockConflict, match="host block 0, which holds request a's KV"):
        index.begin_load("b", [0])
    with pytest.raises(HostBlockConflict, match="request a's load is still reading"):
        index.begin_save("b", [0])
    index.end_load("a", [0, 1])
    index.begin_save("b", [0])  # free again: b's KV replaces a's
    index.end_save("b", [0])
    assert index.holder(0) == "b"


def test_an_abandoned_save_leaves_its_blocks_holding_nothing():
    index = HostBlockIndex()
    index.begin_save("a", [3])
    index.end_save("a", [3], is_done=False)
    assert index.holder(3) is None
    with pytest.raises(HostBlockConflict, match="host block 3, which holds nothing"):
        index.begin_load("a", [3])

