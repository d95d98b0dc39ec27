"""The row and token caps hold in every mode: no step has more rows than `max_num_seqs` or more new
tokens than `max_num_batched_tokens`, counting requests on their way back from the host buffer and
paused requests that resume; requests past the cap wait (paused on the device, or in the host buffer)."""

from __future__ import annotations

import random

import pytest
from core_driver import EOS, Driver, add, reference_outputs

from seesaw.config import SchedulerConfig
from seesaw.kv.host_slots import HostSlots
from seesaw.scheduling.decisions import Phase
from seesaw.scheduling.phases import PhaseScheduler
from seesaw.scheduling.request import RequestStatus
from seesaw.scheduling.static import StaticScheduler
from seesaw.sim.catalog import Catalog
from seesaw.sim.cost import CostModel
from seesaw.sim.simulator import RunSpec, Simulation
from seesaw.sim.workload import sharegpt


def _config(rng: random.Random, overlap: bool) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=rng.randint(8, 40), max_num_seqs=rng.randint(1, 6),
                           watermark=rng.choice([0.0, 0.05]), host_low_water=rng.choice([0.0, 0.2, 0.5]),
                           overlap=overlap, prefill_min_fill=rng.choice([0.0, 0.1, 0.5]),
                           prefetch=rng.choice([True, False]))


def _requests(core, rng: random.Random, tag: str) -> list[tuple[str, int, int]]:
    requests = []
    for index in range(rng.randint(8, 30)):
        prompt_len, max_tokens = rng.randint(1, 40), rng.randint(1, 20)
        if core.capacity_error(prompt_len, max_tokens) is None:
            requests.append((f"{tag}-{index}", prompt_len, max_tokens))
    return requests


def _run(core, rng: random.Random, tag: str) -> Driver:
    requests = _requests(core, rng, tag)
    driver = Driver(core, rng)
    for request in requests:
        add(core, *request)
    driver.run()  # checks the caps at every plan
    assert sorted(driver.finished) == sorted(r for r, _, _ in requests)
    assert driver.outputs == reference_outputs(requests)
    assert core.pool.num_free == core.pool.num_blocks and core.host.num_free_blocks == core.host.num_blocks
    return driver


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_static_steps_stay_within_the_caps_with_evictions_and_restores(seed, micro_batches, overlap):
    rng = random.Random(seed)
    core = StaticScheduler(_config(rng, overlap), rng.randint(12, 40), 4, 400, (EOS,), num_micro_batches=micro_batches,
                           host=HostSlots(rng.choice([0, 16, 64]), 4))
    _run(core, rng, f"static{seed}")


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("depths", [(2, 1), (1, 2), (1, 1)], ids=["p2-t2", "t2-p2", "t1-t1"])
@pytest.mark.parametrize("seed", range(6))
def test_phase_machine_steps_stay_within_the_caps_in_both_directions(seed, depths, overlap):
    rng = random.Random(seed)
    depth = {Phase.PREFILL: depths[0], Phase.DECODE: depths[1]}
    core = PhaseScheduler(_config(rng, overlap), rng.randint(24, 60), 4, 400, (EOS,), depth,
                          HostSlots(rng.randint(24, 80), 4))
    driver = _run(core, rng, f"phases{seed}")
    assert driver.switches.count(Phase.DECODE) >= 1


def test_decode_loads_no_more_requests_than_the_cap_and_the_rest_wait_in_the_host_buffer():
    config = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=4, watermark=0.0)
    core = PhaseScheduler(config, 200, 4, 400, (EOS,), {Phase.PREFILL: 1, Phase.DECODE: 1}, HostSlots(400, 4))
    driver = Driver(core)
    for index in range(12):
        add(core, f"r{index}", 8, 30)
    while core.phase is Phase.PREFILL or driver.moves or driver.steps:
        driver.pump()
        (driver.land_move if driver.moves else driver.land_step)()
        if core.phase is Phase.DECODE and core.running:
            break
    loading = sum(s.status is RequestStatus.RESTORING for s in core.requests.values())
    assert len(core.running) + loading == 4 and len(core.swapped) == 8
    driver.run()
    assert driver.peak_rows == 4 and len(driver.finished) == 12


def test_paused_requests_past_the_cap_stay_paused_until_rows_free_up():
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=3, watermark=0.0, prefill_min_fill=0.0)
    core = PhaseScheduler(config, 200, 4, 400, (EOS,), {Phase.PREFILL: 1, Phase.DECODE: 1}, HostSlots(400, 4))
    driver = Driver(core)
    for index in range(3):
        add(core, f"r{index}", 8, 40)
    while len(core.running) < 3 or core.phase is not Phase.DECODE:
        driver.pump()
        (driver.land_move if driver.moves else driver.land_step)()
    while driver.steps:
        driver.land_step()
    add(core, "late", 8, 2)
    assert core.schedule().switch_to is Phase.PREFILL
    assert len(core.paused) == 3
    driver.run()  # the prompt's decode comes back beside three resumed requests: never four rows
    assert driver.peak_rows == 3 and sorted(driver.finished) == ["late", "r0", "r1", "r2"]


class _CheckedSimulation(Simulation):
    """A simulation that checks every step it models against the caps."""

    peak_rows = 0

    def _step(self, index, phase, plan, shape):
        config = self.spec.scheduler
        assert len(plan.rows) <= config.max_num_seqs
        assert sum(row.num_new_tokens for row in plan.rows) <= config.max_num_batched_tokens
        assert self.engine.cores[index].num_active <= config.max_num_seqs
        self.peak_rows = max(self.peak_rows, len(plan.rows))
        super()._step(index, phase, plan, shape)


@pytest.mark.parametrize("run, peak", [("t2", 16), ("p2", 9), ("p2-t2", 16), ("t2-p2", 9)])
def test_the_simulator_keeps_every_step_within_the_caps(run, peak):
    catalog = Catalog()
    cost = CostModel(catalog.model("tiny"), catalog.node("2xL4"))
    scheduler = SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=16)
    spec = RunSpec.parse(run, scheduler=scheduler, host_buffer_gb=0.05)
    simulation = _CheckedSimulation(cost, spec, sharegpt(200, seed=3))
    result = simulation.run()
    assert result.num_failed == 0 and simulation.peak_rows == peak  # two stages take half the rows each
