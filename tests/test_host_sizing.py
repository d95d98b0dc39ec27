"""The host KV buffer's auto size and its checks: what the node leaves, capped at the job, small in
static mode; clear errors naming sizes when /dev/shm or memory cannot hold it."""

from __future__ import annotations

import pytest

from seesaw.kv.host_sizing import (
    GIB,
    HostBufferPlan,
    NodeMemory,
    auto_host_buffer,
    check_host_buffer,
    few_pools_warning,
)

NODE = NodeMemory(shm_free_bytes=160 * GIB, available_bytes=300 * GIB)  # a 320 GiB node, /dev/shm at half


def _auto(memory=NODE, store=30 * GIB, job=None, seesaw=True, workers=4, least=GIB // 4):
    return auto_host_buffer(memory, store_bytes=store, process_bytes=4 * GIB, min_bytes=least, job_bytes=job,
                            is_seesaw=seesaw, num_workers=workers)


def test_a_pair_takes_what_shared_memory_leaves_beside_the_weight_store():
    plan = _auto()
    assert plan.num_bytes == 130 * GIB  # /dev/shm, less the weight store, is the tighter bound
    assert plan.reason.startswith("host KV buffer 130.0 GiB (auto): what the node leaves")
    assert "30.0 GiB of it for the weight store" in plan.reason and not plan.holds_whole_job


def test_memory_bounds_it_when_shared_memory_is_larger_than_what_is_available():
    plan = _auto(NodeMemory(shm_free_bytes=400 * GIB, available_bytes=100 * GIB))
    assert plan.num_bytes == (100 - 30 - 4 - 10) * GIB  # less the store, the processes and a tenth kept back


def test_a_known_job_smaller_than_the_room_caps_it():
    plan = _auto(job=3 * GIB)
    assert plan.num_bytes == 3 * GIB and plan.holds_whole_job and "the whole job's KV" in plan.reason
    assert _auto(job=GIB // 10).num_bytes == GIB // 4  # never below one full-length request per replica


def test_static_mode_parks_evicted_requests_in_a_device_pool_per_worker_at_most_4_gib():
    plan = _auto(store=0, seesaw=False, workers=2)
    assert plan.num_bytes == 8 * GIB and "4.0 GiB per worker" in plan.reason
    assert _auto(store=0, seesaw=False, workers=2, job=GIB).num_bytes == GIB
    small_pools = auto_host_buffer(NODE, store_bytes=0, process_bytes=0, min_bytes=0, job_bytes=None, is_seesaw=False,
                                   num_workers=2, pool_bytes=GIB // 2)
    assert small_pools.num_bytes == GIB and "512.0 MiB per worker" in small_pools.reason


def test_too_little_shared_memory_for_a_pair_says_how_to_enlarge_it():
    small = NodeMemory(shm_free_bytes=31 * GIB, available_bytes=300 * GIB)
    with pytest.raises(ValueError) as error:
        _auto(small, least=2 * GIB)
    message = str(error.value)
    assert message.startswith("/dev/shm has 31.00 GiB free; seesaw mode keeps the weight store (30.00 GiB)")
    assert "at least 2.00 GiB" in message and "--shm-size" in message and "remount" in message


def test_too_little_memory_for_a_pair_names_what_takes_it():
    tight = NodeMemory(shm_free_bytes=300 * GIB, available_bytes=36 * GIB)
    with pytest.raises(ValueError, match=r"this host has 36.00 GiB of memory available; .*weight store \(30.00 GiB\)"):
        _auto(tight, least=2 * GIB)


def test_a_size_asked_for_must_fit_shared_memory_beside_the_weight_store():
    check_host_buffer(100 * GIB, NODE, 30 * GIB)
    with pytest.raises(ValueError) as error:
        check_host_buffer(140 * GIB, NODE, 30 * GIB)
    assert str(error.value).startswith("--host-buffer-gb 140 does not fit /dev/shm, which has 160.00 GiB free "
                                       "beside the 30.00 GiB weight store")


def test_a_buffer_of_a_few_device_pools_is_warned_about_unless_it_holds_the_whole_job():
    plan = HostBufferPlan(GIB, "")
    assert "holds 2.0 device KV pools' worth per replica" in few_pools_warning(plan, 200, 100)
    assert "--host-buffer-gb" in few_pools_warning(plan, 200, 100)
    assert few_pools_warning(plan, 400, 100) is None
    assert few_pools_warning(HostBufferPlan(GIB, "", holds_whole_job=True), 200, 100) is None
