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
from seesaw.transport.shared_memory import is_held, reclaim_orphans


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


def test_leftovers_no_live_process_holds_are_reclaimed_and_held_ones_kept(tmp_path):
    shm, runs = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    runs.mkdir()
    orphan = shm / "seesaw-kv-123456-deadbeef"  # as a killed run leaves it: nobody holds its lock
    orphan.write_bytes(b"x")
    orphan_run = runs / "seesaw-run-123456-abc123"
    orphan_run.mkdir()
    held = shm / "seesaw-weights-123457-cafe"
    held.write_bytes(b"x")
    held_run = runs / "seesaw-run-123457-def456"
    held_run.mkdir()
    unrelated = shm / "other-program-1"
    unrelated.write_bytes(b"x")
    # Another process holds the locks, as a live run in this or another PID namespace would.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"locks = [os.open(p, os.O_RDONLY) for p in ({str(held)!r}, {str(held_run)!r})]\n"
        "[fcntl.flock(fd, fcntl.LOCK_EX) for fd in locks]\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        removed = reclaim_orphans([shm, runs])
    finally:
        holder.communicate("", timeout=30)
    assert sorted(removed) == sorted([str(orphan), str(orphan_run)])
    assert held.exists() and held_run.exists() and unrelated.exists()


def test_a_segment_is_held_while_its_creator_has_it_open():
    buffer = HostBuffer.create(num_blocks=1, block_shape=[1, 2, 1, 4, 8], dtype="float32")
    try:
        assert is_held(Path("/dev/shm") / buffer.spec.name)
    finally:
        buffer.close()
