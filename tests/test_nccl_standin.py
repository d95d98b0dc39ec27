"""The NCCL communicator's code path on CPU, through a gloo-backed stand-in for cupy's NCCL
(tests/nccl_standin.py): strided tensors, every operation, a group that never forms."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import nccl_standin
from seesaw.transport.specs import GroupSpec
from seesaw.transport.addresses import JoinError

CPU = torch.device("cpu")


@pytest.fixture
def standin(monkeypatch, tmp_path):
    monkeypatch.setenv(nccl_standin.STANDIN_DIR, str(tmp_path))
    monkeypatch.setenv(nccl_standin.JOIN_TIMEOUT, "3")
    for name in ("cupy", "cupy.cuda", "cupy.cuda.nccl"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    nccl_standin.install()
    yield
    for name in ("cupy", "cupy.cuda", "cupy.cuda.nccl"):
        sys.modules.pop(name, None)


def _on_ranks(size: int, work) -> list:
    """Run work(rank) for each rank on a thread of its own; returns results (or raised errors)."""
    results: list = [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except Exception as error:  # handed back to the test, which asserts on it
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a rank is still waiting"
    return results


def test_a_strided_view_is_reduced_element_by_element(standin):
    from seesaw.transport.collective import make_nccl_id, nccl_groups

    spec = GroupSpec("ranks:0,1", [0, 1], make_nccl_id())

    def work(rank: int):
        comm = nccl_groups([spec], rank, CPU, timeout_s=10)[spec.key]
        base = torch.arange(24, dtype=torch.float32).view(4, 6) * (rank + 1)  # [4, 6]
        view = base[:, 1:5:2]  # [4, 2] strided: numel() elements from data_ptr() are not these
        comm.all_reduce(view)
        received = torch.zeros(3, 4)[:, ::2]  # [3, 2] strided
        if rank == 0:
            comm.send(torch.ones(3, 2) * 7, 1)
        else:
            comm.recv(received, 0)
        gathered = comm.all_gather(torch.full((2, 3), float(rank)))
        comm.broadcast(shared := torch.full((2, 2), float(rank + 5))[:, :1], 1)
        return base, received, gathered, shared

    (base0, _, gathered, shared), (base1, received, _, _) = _on_ranks(2, work)
    expected = torch.arange(24, dtype=torch.float32).view(4, 6)
    assert torch.equal(base0[:, 1:5:2], expected[:, 1:5:2] * 3)
    assert torch.equal(base0[:, 0], expected[:, 0])  # untouched between the view's columns
    assert torch.equal(base1[:, 2], expected[:, 2] * 2)
    assert torch.equal(received, torch.full((3, 2), 7.0))
    assert torch.equal(gathered, torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
    assert torch.equal(shared, torch.full((2, 1), 6.0))


def test_groups_created_in_different_orders_fail_naming_the_group(standin):
    from seesaw.transport.collective import make_nccl_id, nccl_groups

    first, second = GroupSpec("ranks:0,1", [0, 1], make_nccl_id()), GroupSpec("ranks:0,1/b", [0, 1], make_nccl_id())
    orders = {0: [first, second], 1: [second, first]}
    results = _on_ranks(2, lambda rank: nccl_groups(orders[rank], rank, CPU, timeout_s=1))
    assert all(isinstance(result, JoinError) for result in results)
    assert "waited 1 s for NCCL group ranks:0,1 (ranks 0, 1)" in str(results[0])
    assert "in another order" in str(results[1])
