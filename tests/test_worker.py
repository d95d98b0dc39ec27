"""How a worker process finds its place on its host, and what it is told at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seesaw.layout import Layout
from seesaw.worker import WorkerOptions, local_rank


def test_a_worker_takes_the_gpu_its_launcher_names():
    assert local_rank(3, {"LOCAL_RANK": "1"}) == 3  # --local-rank wins
    assert local_rank(None, {"LOCAL_RANK": "1", "SLURM_LOCALID": "2"}) == 1
    assert local_rank(None, {"SLURM_LOCALID": "2"}) == 2


@pytest.mark.parametrize("options", [
    WorkerOptions(head="tcp://10.0.0.1:5555"),
    WorkerOptions(head="ipc:///run/seesaw/supervisor", rank=3, inbox="ipc:///run/seesaw/worker-3-0", local_rank=3,
                  heartbeat_s=0.5, head_timeout_s=20.0, join_timeout_s=5.0, advertise_address="10.0.0.2",
                  parent_pid=1234, log_level="INFO"),
])
def test_worker_options_come_back_from_their_encoding_unchanged(options):
    assert WorkerOptions.decode(options.encode()) == options


@pytest.mark.parametrize("text,problem", [
    ("--head tcp://h:1", "not JSON"),
    ("[1, 2]", "must be a JSON object with 'head'"),
    ('{"rank": 1}', "must be a JSON object with 'head'"),
    ('{"head": "tcp://h:1", "ranks": 1}', "no keys but .*'rank'.*got .*ranks"),
])
def test_bad_worker_options_are_refused_naming_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        WorkerOptions.decode(text)


@pytest.mark.parametrize("argv,problem", [
    ([], "usage: python -m seesaw.worker OPTIONS"),
    (["--head", "tcp://h:1"], "usage: python -m seesaw.worker OPTIONS"),
    (["{}"], "seesaw.worker: worker options must be a JSON object with 'head'"),
])
def test_the_worker_module_given_anything_but_its_options_says_what_it_takes(argv, problem):
    done = subprocess.run([sys.executable, "-m", "seesaw.worker", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and problem in done.stderr and "Traceback" not in done.stderr


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
        worker.handle(Prefetch(transfer_id=1, request_id="r1", layout=Layout(), host_block_ids=[0], block_ids=[0]))
    assert "rank 3 is stopping: not prefetching request r1" in caplog.text
    assert not worker.has_failed and not delivered


GPU_1 = 1
AGAIN = Layout(dp=2)  # a second name for the one layout's shard (one this worker's run does not use)


def _runtime_on_gpu_1(monkeypatch):
    """A worker runtime of the tiny preset built on the CPU, then given GPU 1 of 2's CUDA pieces
    (streams, the upload's staging and device buffers, pending tokens' pinned copies) under the
    recording stand-in, which runs them on CPU tensors; returns (the record, the runtime). A
    second name for its layout makes a Reshard reload the shard."""
    import copy
    from types import SimpleNamespace

    import torch

    import cuda_standin
    from seesaw.layout import Layout
    from seesaw.model.presets import PRESETS
    from seesaw.model.spec import ModelSpec
    from seesaw.model.weights import RandomSource
    from seesaw.runtime.step_inputs import Uploader
    from seesaw.runtime.transfers import DeviceCopies
    from seesaw.runtime.worker_runtime import RuntimeConfig, WorkerRuntime

    spec = ModelSpec.from_hf_config(PRESETS["tiny"])
    config = RuntimeConfig(spec, 0, (Layout.parse("t1"),), "float32", "cpu", 16, kv_cache_bytes=1 << 20,
                           memory_fraction=0.9, num_threads=1, seed=0, max_step_tokens=64, max_step_rows=8)
    runtime = WorkerRuntime(config, {}, RandomSource(spec, 0))
    cuda = cuda_standin.install(monkeypatch)
    torch.cuda.set_device(GPU_1)  # as the step thread does before it builds the runtime
    runtime.device = torch.device("cuda", GPU_1)
    runtime.copies = DeviceCopies(runtime.device)
    runtime.uploader = Uploader(runtime.device, runtime.bounds.upload_values(is_ragged=False))
    runtime.states[AGAIN] = copy.copy(runtime.states[Layout()])
    pages = runtime.current.kv_pages
    runtime.host_buffer = SimpleNamespace(blocks=torch.zeros(4, *pages.shape[1:]),  # [host blocks, ...]
                                          local=lambda host_block_ids: list(host_block_ids))  # blocks from 0
    return cuda, runtime


async def _run_on_gpu_1(monkeypatch):
    """Drive a ShardWorker on local rank 1 of 2 through steps, a KV swap out, a transition and a
    prefetch, under the recording stand-in; returns (the record, the runtime, the replies)."""
    import asyncio

    from seesaw.actors.shard_worker import ShardWorker
    from seesaw.messages import Prefetch, Reshard, RunStep, SwapOut
    from seesaw.step import RowSampling, StepRow

    worker = ShardWorker(inbox=None, rank=1, supervisor=None, context=None, local_rank=GPU_1)
    cuda, worker.runtime = _runtime_on_gpu_1(monkeypatch)
    replies: asyncio.Queue = asyncio.Queue()
    worker.scheduler = worker.kv_tier = type("Outbox", (), {"send": staticmethod(replies.put_nowait)})()
    greedy = RowSampling(0.0)
    commands = [
        RunStep(1, [StepRow("a", [5, 6, 7], 0, [0], sampling=greedy), StepRow("b", [8, 9], 0, [1], sampling=greedy)]),
        RunStep(2, [StepRow("a", [11], 3, [], 1, sampling=greedy), StepRow("b", [12], 2, [], 1, sampling=greedy)]),
        SwapOut(transfer_id=1, request_id="a", layout=Layout(), block_ids=[0], host_block_ids=[2]),
        Reshard(AGAIN),
        RunStep(3, [StepRow("b", [13], 3, [], 1, sampling=greedy)], released=["a"]),
        Prefetch(transfer_id=2, request_id="a", layout=AGAIN, host_block_ids=[2], block_ids=[3]),
    ]
    received = []
    try:
        for command in commands:  # one at a time: each reply lands before the next command
            worker.handle(command)
            received.append(await asyncio.wait_for(replies.get(), 10))
    finally:
        for executor in (worker._compute, worker._copies, worker._tokens):
            executor.shutdown()
    return cuda, worker.runtime, received


async def test_a_worker_on_gpu_1_of_2_never_touches_gpu_0(monkeypatch):
    """Steps, the upload, pending tokens, KV copies and a transition of local rank 1 of 2 use device
    1 only: no allocation, stream, event or copy lands on device 0, on any thread."""
    cuda, _, replies = await _run_on_gpu_1(monkeypatch)
    assert len(replies) == 6 and replies[-1].num_bytes > 0
    assert [use for use in cuda.uses if use.device != GPU_1] == []


async def test_every_thread_binds_its_gpu_before_it_uses_one(monkeypatch):
    """The step, KV-copy and token threads (and the one that built the runtime) each set their
    device before any allocation, stream, event or copy: a thread starts on GPU 0."""
    cuda, _, _ = await _run_on_gpu_1(monkeypatch)
    threads = {use.thread.split("_")[0] for use in cuda.uses}
    assert {"step", "kv-copy", "tokens"} <= threads
    assert not cuda.threads_that_used_a_device_before_setting_it()


async def test_steps_run_on_the_workers_compute_stream_never_the_default_one(monkeypatch):
    """Every copy and event of a step (the upload, the sampled tokens' copy to pinned memory) is
    queued on the compute stream of the worker's own; nothing runs on the legacy default stream."""
    cuda, runtime, _ = await _run_on_gpu_1(monkeypatch)
    compute = runtime.copies.compute_stream.name
    step_uses = [use for use in cuda.uses if use.thread.startswith("step") and use.what in ("copy", "event record")]
    weight_copies = [use for use in step_uses if use.stream == runtime.copies.weight_stream.name]
    assert step_uses and weight_copies
    assert {use.stream for use in step_uses if use not in weight_copies} == {compute}
    assert not [use for use in cuda.uses if (use.stream or "").startswith("default")]


async def test_steps_after_a_transition_wait_for_the_weight_stream(monkeypatch):
    """A reload's copies run on the weight stream after the compute stream's queued work, and the
    compute stream waits for them before the next step's first copy."""
    cuda, runtime, _ = await _run_on_gpu_1(monkeypatch)
    compute, weight = runtime.copies.compute_stream.name, runtime.copies.weight_stream.name
    uses = cuda.uses
    weight_copies = [i for i, use in enumerate(uses) if use.what == "copy" and use.stream == weight]
    before = [i for i, use in enumerate(uses) if use.what == "wait_stream" and use.stream == weight
              and use.waited_for == compute]
    after = [i for i, use in enumerate(uses) if use.what == "wait_stream" and use.stream == compute
             and use.waited_for == weight]
    later_steps = [i for i, use in enumerate(uses) if use.what == "copy" and use.stream == compute
                   and i > weight_copies[-1]]
    assert before and before[-1] < weight_copies[0]
    assert after and weight_copies[-1] < after[-1] < later_steps[0]


async def test_a_staging_buffer_is_rewritten_only_once_its_last_copy_is_done(monkeypatch):
    """The upload's two pinned staging buffers take turns; before either is written again, the
    event recorded after the copy that read it is waited for."""
    cuda, runtime, _ = await _run_on_gpu_1(monkeypatch)
    uploader = runtime.uploader
    for staging, event in zip(uploader.staging, uploader.copied):
        writes = [i for i, use in enumerate(cuda.uses) if use.what == "copy" and use.target == staging.data_ptr()]
        records = [i for i, use in enumerate(cuda.uses) if use.what == "event record" and use.event == event.name]
        waits = [i for i, use in enumerate(cuda.uses) if use.what == "event synchronize" and use.event == event.name]
        assert writes and records
        for write in writes:
            last_record = max((i for i in records if i < write), default=None)
            assert last_record is None or any(last_record < i < write for i in waits), \
                f"staging buffer written at use {write} while its copy recorded at {last_record} may still read it"


async def test_the_kv_stream_waits_for_compute_before_it_copies(monkeypatch):
    """KV written by the steps queued so far lands before a swap out reads it: each KV command's
    stream waits for the compute stream before its first copy."""
    cuda, runtime, _ = await _run_on_gpu_1(monkeypatch)
    kv, compute = runtime.copies.kv_stream.name, runtime.copies.compute_stream.name
    copy_thread = [use for use in cuda.uses if use.thread.startswith("kv-copy")]
    copies = [i for i, use in enumerate(copy_thread) if use.what == "copy"]
    waits = [i for i, use in enumerate(copy_thread) if use.what == "wait_stream" and use.stream == kv
             and use.waited_for == compute]
    assert len(waits) == 2 and waits[0] < copies[0]
    assert all(copy_thread[i].stream == kv for i in copies)


def test_the_nccl_join_thread_binds_the_workers_gpu_before_forming_a_group(monkeypatch, tmp_path):
    """A communicator of GPU 1 is formed on a thread of its own (so a dead peer cannot hang the
    worker past its timeout); that thread makes GPU 1 current first and never lands on GPU 0."""
    import sys
    import types

    import torch

    import cuda_standin
    import nccl_standin
    from seesaw.transport.specs import GroupSpec
    from seesaw.transport.collective import nccl_groups

    cuda = cuda_standin.install(monkeypatch)
    monkeypatch.setenv(nccl_standin.STANDIN_DIR, str(tmp_path))
    cupy, cupy_cuda = types.ModuleType("cupy"), types.ModuleType("cupy.cuda")
    cupy.cuda, cupy_cuda.nccl = cupy_cuda, nccl_standin
    for name, module in {"cupy": cupy, "cupy.cuda": cupy_cuda, "cupy.cuda.nccl": nccl_standin}.items():
        monkeypatch.setitem(sys.modules, name, module)
    groups = nccl_groups([GroupSpec("ranks:1", [1], nccl_standin.get_unique_id())], 1, torch.device("cuda", GPU_1),
                         timeout_s=10)
    joining = [use for use in cuda.uses if use.thread.startswith("nccl-join")]
    assert list(groups) == ["ranks:1"]
    assert joining and joining[0].what == "set_device" and all(use.device == GPU_1 for use in joining)
