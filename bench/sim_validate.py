"""The simulator against the real engine on this machine: run each layout for real, simulate it with
the calibrated profile, print both and the error.

    .venv/bin/seesaw-cli calibrate            # once: writes ~/.cache/seesaw/profiles/local-cpu.json
    .venv/bin/python bench/sim_validate.py --runs t1,t2,p2,d2,p2-t2

Runs are `LAYOUT` (static) or `PREFILL-DECODE` (seesaw mode), on the default model by default,
with fixed-length random prompts (greedy, EOS ignored), as bench/throughput.py runs them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from seesaw.config import SchedulerConfig, default_cache_dir
from seesaw.model.resolve import resolve_model
from seesaw.sim.catalog import Catalog
from seesaw.sim.cost import CostModel
from seesaw.calibrate.measure import calibrate, run_engine, step_overhead_ms
from seesaw.sim.simulator import RunSpec, simulate
from seesaw.sim.workload import fixed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="t1,t2,p2,d2,p2-t2")
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--profile-name", default="local-cpu", help="the name given to seesaw-cli calibrate")
    parser.add_argument("--host-buffer-gb", type=float, default=1.0)
    parser.add_argument("--simulate-only", action="store_true", help="print predictions without running the engine")
    parser.add_argument("--calibrate", action="store_true", help="calibrate this machine right before each run (it is "
                        "often shared: measuring just before a run keeps the profile close to the machine it meets)")
    parser.add_argument("--repeats", type=int, default=1, help="run each layout this many times and keep the fastest")
    parser.add_argument("--output-json", default=None)
    return parser.parse_args(argv)


def predict(cost_for, run: str, args: argparse.Namespace):
    spec = RunSpec.parse(run, host_buffer_gb=args.host_buffer_gb, scheduler=SchedulerConfig(max_num_batched_tokens=512))
    return simulate(cost_for(spec.layout.world_size), spec, fixed(args.num_prompts, args.input_len, args.output_len))


def main(argv=None) -> None:
    args = parse_args(argv)
    spec = resolve_model(args.model, default_cache_dir()).spec
    profile_path = default_cache_dir() / "profiles" / f"{args.profile_name}.json"
    overhead_ms = step_overhead_ms() if args.calibrate else None

    def cost_for(workers: int) -> CostModel:
        catalog = Catalog(sorted((default_cache_dir() / "profiles").glob("*.json")))
        return CostModel(spec, catalog.node(f"{workers}x{args.profile_name}-w{workers}"))

    rows = []
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if args.calibrate:
            workers = RunSpec.parse(run).layout.world_size
            profile_path.parent.mkdir(parents=True, exist_ok=True)
            profile_path.write_text(json.dumps(calibrate(args.profile_name, [workers], overhead_ms=overhead_ms), indent=2))
        print(f"{'run':<8} {'measured s':>10} {'predicted s':>11} {'error':>7} {'steps':>11} {'transitions':>11}"
              f"  (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
        predicted = predict(cost_for, run, args)
        measured = None
        if not args.simulate_only:
            measured = min((run_engine(args.model, run, args.num_prompts, args.input_len, args.output_len,
                                       host_buffer_gb=args.host_buffer_gb)
                            for _ in range(args.repeats)), key=lambda result: result["elapsed_s"])
        error = (predicted.elapsed_s / measured["elapsed_s"] - 1) if measured else None
        steps = f"{measured['steps'] if measured else '-'}/{predicted.num_steps}"
        real_transitions = measured["transitions"] if measured else "-"
        print(f"{run:<8} {measured['elapsed_s'] if measured else float('nan'):>10.1f} {predicted.elapsed_s:>11.1f} "
              f"{'' if error is None else f'{100 * error:+.0f}%':>7} {steps:>11} "
              f"{real_transitions}/{len(predicted.transitions):>9}", flush=True)
        rows.append({"run": run, "measured_s": measured and measured["elapsed_s"], "predicted_s": predicted.elapsed_s,
                     "error": error, "measured_steps": measured and measured["steps"],
                     "measured_phase_s": measured and measured["stats"].run.phase_seconds,
                     "predicted": predicted.summary()})
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
