"""The shared-memory host KV buffer: shared between processes, removed by its owner, sized honestly."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seesaw.transport.host_buffer import HostBuffer
from seesaw.transport.shared_memory import reclaim_orphans


def _fill(spec, value):
    buffer = HostBuffer.attach(spec)
    buffer.blocks[1].fill_(value)
    buffer.close()


def test_a_second_process_sees_the_same_blocks_and_the_owner_removes_them():
    buffer = HostBuffer.create(num_blocks=3, block_shape=[2, 2, 1, 4, 8], dtype="float32")
    process = multiprocessing.get_context("spawn").Process(target=_fill, args=(buffer.spec, 7.0))
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert torch.all(buffer.blocks[1] == 7.0) and torch.all(buffer.blocks[0] == 0.0)
    path = Path("/dev/shm") / buffer.spec.name
    assert path.exists()
    buffer.close()
    assert not path.exists()


def test_a_buffer_larger_than_shared_memory_is_refused_up_front():
    with pytest.raises(ValueError, match="lower --host-buffer-gb"):
        HostBuffer.create(num_blocks=1 << 20, block_shape=[64, 2, 8, 16, 128], dtype="float32")
    assert not list(Path("/dev/shm").glob(f"seesaw-kv-{os.getpid()}-*"))  # this process left nothing


def test_what_processes_that_are_gone_left_is_reclaimed_and_what_live_ones_hold_is_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    shm, runs = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    runs.mkdir()
    orphan = shm / f"seesaw-kv-{dead_pid}-deadbeef"
    orphan.write_bytes(b"x")
    orphan_run = runs / f"seesaw-run-{dead_pid}-abc123"
    orphan_run.mkdir()
    mine = shm / f"seesaw-weights-{os.getpid()}-cafe"
    mine.write_bytes(b"x")
    unrelated = shm / "other-program-1"
    unrelated.write_bytes(b"x")
    removed = reclaim_orphans([shm, runs])
    assert sorted(removed) == sorted([str(orphan), str(orphan_run)])
    assert mine.exists() and unrelated.exists()
