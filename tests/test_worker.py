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


class _CopyOnlyRuntime:
    """A worker's runtime on GPU 1 of 2 reduced to its KV copies, for the CUDA stand-in."""

    def __init__(self):
        import torch

        from seesaw.runtime.transfers import DeviceCopies
        from seesaw.runtime.worker_runtime import WorkerRuntime

        self.device = torch.device("cuda", 1)
        self.copies = DeviceCopies(self.device)
        self.bind_thread = WorkerRuntime.bind_thread.__get__(self)
        self.pool = torch.zeros(4, 8)  # [blocks, elements]
        self.host = torch.arange(32.0).view(4, 8)

    def swap_out(self, layout, block_ids, host_block_ids) -> int:
        return self.copies.kv_copy([(self.host[h], self.pool[b]) for b, h in zip(block_ids, host_block_ids)])


async def test_the_copy_thread_of_gpu_1_binds_it_and_never_touches_gpu_0(monkeypatch):
    """Rehearsed with a recording stand-in for torch's CUDA streams: the KV-copy thread sets its
    device before its first stream, never lands on device 0 (a stream context on a thread left at
    device 0 would switch back there on exit, making a context on GPU 0), and its KV stream waits
    for the compute stream before it copies."""
    import asyncio

    import cuda_standin
    from seesaw.actors.shard_worker import ShardWorker
    from seesaw.messages import SwapOut

    cuda = cuda_standin.install(monkeypatch)
    worker = ShardWorker(inbox=None, rank=1, supervisor=None, context=None, local_rank=1)
    cuda.set_device(1)  # as the step thread does before it builds the runtime
    worker.runtime = _CopyOnlyRuntime()
    delivered = asyncio.get_running_loop().create_future()

    class KVTier:
        def send(self, message):
            delivered.set_result(message)

    worker.kv_tier = KVTier()
    worker.handle(SwapOut(transfer_id=1, request_id="r1", layout="t1", block_ids=[2], host_block_ids=[0]))
    reply = await asyncio.wait_for(delivered, 10)
    for executor in (worker._compute, worker._copies, worker._tokens):
        executor.shutdown()
    assert reply.num_bytes == 32
    copy_thread = [use for use in cuda.uses if use.thread.startswith("kv-copy")]
    assert copy_thread[0].what == "set_device" and copy_thread[0].device == 1
    assert all(use.device == 1 for use in copy_thread), [use for use in copy_thread if use.device != 1]
    assert not cuda.threads_that_used_a_device_before_setting_it()
    copies = [index for index, use in enumerate(copy_thread) if use.what == "copy"]
    waits = [index for index, use in enumerate(copy_thread) if use.what == "wait_stream"
             and use.waited_for == "default-1"]
    assert copies and waits and waits[0] < copies[0]
    assert all(copy_thread[index].stream.startswith("stream-") for index in copies)  # on the KV stream
