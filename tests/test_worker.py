"""How a worker process finds its place on its host."""

from __future__ import annotations

from seesaw.worker import local_rank


def test_a_worker_takes_the_gpu_its_launcher_names():
    assert local_rank(3, {"LOCAL_RANK": "1"}) == 3  # --local-rank wins
    assert local_rank(None, {"LOCAL_RANK": "1", "SLURM_LOCALID": "2"}) == 1
    assert local_rank(None, {"SLURM_LOCALID": "2"}) == 2
