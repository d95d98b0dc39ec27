"""What loading host requests during the end of prefill buys, predicted by the simulator: the
decode batch of the first decode steps after each switch, and the whole run's time, with the
prefetch on (the default) and off, for pairs of the Seesaw paper's nodes at a few host buffers.

    .venv/bin/python bench/prefetch.py
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from seesaw.sim.catalog import Catalog
from seesaw.sim.cost import CostModel
from seesaw.sim.planner import PlanOptions, candidates, with_host_buffer
from seesaw.sim.simulator import Simulation
from seesaw.sim.workload import arxiv, sharegpt

SETTINGS = [  # model, node, pair, workload, host buffers (GiB; None: auto)
    ("llama3-15b", "4xL4", "p4->t4", "sharegpt", (4.0, 16.0, None)),
    ("llama3-15b", "4xA10G", "p4->t4", "arxiv", (None,)),
    ("codellama-34b", "8xA10G", "p8->t4p2", "arxiv", (None,)),
]
FIRST_STEPS = 4  # decode steps counted after each switch to decode


class _Recording(Simulation):
    """A simulation that keeps the rows of the first decode steps after each switch."""

    def __init__(self, *args):
        super().__init__(*args)
        self.first_rows: list[int] = []
        self._seen_switches = 0
        self._left = 0

    def _step(self, index, phase, plan, shape):
        switches = len(self.engine.metrics.transitions)
        if switches != self._seen_switches:
            self._seen_switches, self._left = switches, FIRST_STEPS
        if phase.value == "decode" and self._left:
            self.first_rows.append(shape.num_decode_rows)
            self._left -= 1
        super()._step(index, phase, plan, shape)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    catalog = Catalog()
    print(f"{'model':<14} {'node':<7} {'pair':<9} {'workload':<9} {'buffer':>8} {'switches':>8} "
          f"{'first decode rows (on / off)':>29} {'time s (on / off)':>18} {'gain':>6}")
    for model, gpus, pair, workload_name, buffers in SETTINGS:
        count = int(gpus.split("x")[0])
        cost = CostModel(catalog.model(model), catalog.node(gpus, "pcie4x8", 80 * count))
        workload = (arxiv if workload_name == "arxiv" else sharegpt)(args.requests)
        base = next(spec for spec in candidates(cost, PlanOptions()) if str(spec) == pair)
        for buffer_gb in buffers:
            spec = with_host_buffer(cost, replace(base, host_buffer_gb=buffer_gb), workload)
            runs = []
            for prefetch in (True, False):
                simulation = _Recording(cost, replace(spec, scheduler=replace(spec.scheduler, prefetch=prefetch)),
                                        workload)
                result = simulation.run()
                rows = simulation.first_rows
                runs.append((sum(rows) / max(1, len(rows)), result.elapsed_s, len(result.transitions)))
            (rows_on, time_on, switches), (rows_off, time_off, _) = runs
            label = f"{spec.host_buffer_gb:.0f} GiB" + ("*" if buffer_gb is None else "")
            print(f"{model:<14} {gpus:<7} {pair:<9} {workload_name:<9} {label:>8} {switches:>8} "
                  f"{rows_on:>14.1f} / {rows_off:<12.1f} {time_on:>8.1f} / {time_off:<8.1f} "
                  f"{time_off / time_on - 1:>+6.1%}", flush=True)
    print("* auto: what the engine would size on such a node (/dev/shm at half of 80 GiB per GPU)")


if __name__ == "__main__":
    main()
