"""The shared-memory host KV buffer: shared between processes, removed by its owner, sized honestly."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from seesaw.transport.host_buffer import HostBuffer


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
    assert not list(Path("/dev/shm").glob("seesaw-kv-*"))
