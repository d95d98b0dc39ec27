"""How a worker process finds its place on its host."""

from __future__ import annotations

from seesaw.worker import local_rank


def test_a_worker_takes_the_gpu_its_launcher_names():
    assert local_rank(3, {"LOCAL_RANK": "1"}) == 3  # --local-rank wins
    assert local_rank(None, {"LOCAL_RANK": "1", "SLURM_LOCALID": "2"}) == 1
    assert local_rank(None, {"SLURM_LOCALID": "2"}) == 2


async def test_a_stopping_worker_drops_a_copy_its_executors_no_longer_take(caplog):
    import logging
    from types import SimpleNamespace

    from seesaw.actors.shard_worker import ShardWorker
    from seesaw.messages import Prefetch

    worker = ShardWorker(inbox=None, rank=3, supervisor=None, context=None)
    delivered = []
    worker.kv_tier = SimpleNamespace(send=delivered.append)
    for executor in (worker._compute, worker._copies, worker._tokens):  # as stop() leaves them
        executor.shutdown()
    with caplog.at_level(logging.DEBUG, logger="seesaw.actors.shard_worker"):
        worker.handle(Prefetch(transfer_id=1, request_id="r1", layout="t1", host_block_ids=[0], block_ids=[0]))
    assert "rank 3 is stopping: not prefetching request r1" in caplog.text
    assert not worker.has_failed and not delivered
