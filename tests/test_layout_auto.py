"""`--layout auto` and the planner's word on a named pair, as users run them: the simulator plans
this node (a CPU profile in the run's cache folder) on the job's own lines, says what it chose,
and the run goes on with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from seesaw_cli.layout_choice import wants_auto


def _profile(host_link_gbs: float) -> dict:
    """A two-worker CPU node as calibrate writes one (float32, a fixed 0.05 GiB KV pool per worker)."""
    return {
        "gpus": {"local-cpu-w2": {
            "memory_gb": 16, "memory_bandwidth_gbs": 13, "peak_tflops": 0.05, "interconnect": "test-gloo-w2",
            "host_link": "test-host-w2", "host_memory_gb": 4, "dtype_bytes": 4, "matmul_efficiency": 0.9,
            "memory_efficiency": 0.8, "attention_efficiency": 0.3, "step_overhead_ms": 3.0, "row_overhead_us": 1000,
            "kv_cache_gb": 0.05, "token_budget": 512, "copy_overlap": 0.0, "device": "cpu"}},
        "links": {"test-gloo-w2": {"bandwidth_gbs": 2.6, "efficiency": 1.0, "latency_us": 300,
                                   "all_reduce_gbs": {"2": 1.0}},
                  "test-host-w2": {"bandwidth_gbs": host_link_gbs, "efficiency": 1.0, "latency_us": 0}},
    }


def _run(tmp_path, model, host_link_gbs: float, *flags) -> tuple[subprocess.CompletedProcess, list[dict]]:
    cache = tmp_path / "cache"
    (cache / "profiles").mkdir(parents=True)
    (cache / "profiles" / "local-cpu.json").write_text(json.dumps(_profile(host_link_gbs)))
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [orjson.dumps({"id": f"r{i}", "prompt": [5 + i] * (6 + 3 * i), "max_tokens": 3, "temperature": 0})
             for i in range(6)] + [b"not json"]
    source.write_bytes(b"\n".join(lines) + b"\n")
    command = [sys.executable, "-m", "seesaw_cli.main", "batch", str(source), "-o", str(results), "--model",
               str(model), "--threads", "1", "--kv-cache-gb", "0.05", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "SEESAW_CACHE_DIR": str(cache)})
    return done, [orjson.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def test_layout_auto_plans_with_the_lines_it_can_read_and_says_its_choice(tiny_models, tmp_path):
    done, results = _run(tmp_path, tiny_models["llama-gqa-tied"], 10.0, "--layout", "auto", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert ("layout auto: planning with 6 of the 7 lines of in.jsonl (the first 7 read; 1 could not be read and "
            "were left out)") in done.stderr
    chosen = next(line for line in done.stderr.splitlines() if line.startswith("layout auto on 2xlocal-cpu-w2"))
    assert "chosen: " in chosen and "runner-up: " in done.stderr
    name = chosen.split("chosen: ")[1].split(" ")[0]
    assert f"({name.replace('->', ' -> ')}, cpu)" in done.stderr or f"{name}, cpu)" in done.stderr  # the run's banner
    assert sorted(r["custom_id"] for r in results) == sorted([f"r{i}" for i in range(6)] + ["line-7"])


def test_a_named_pair_predicted_to_lose_runs_with_a_warning(tiny_models, tmp_path):
    # Host copies at a trickle: every request's KV crosses them twice in a pair, never in t2.
    done, results = _run(tmp_path, tiny_models["llama-gqa-tied"], 0.001, "--prefill-layout", "p2",
                         "--decode-layout", "t2")
    assert done.returncode == 0, done.stderr
    warning = next(line for line in done.stderr.splitlines() if line.startswith("warning: p2->t2 is predicted at"))
    assert "x the best static layout" in warning and "running it as asked" in warning
    assert len(results) == 7


@pytest.mark.parametrize("layout, pair, device, workers, expected", [
    ("auto", False, "cpu", None, True), (None, False, "cpu", None, False), (None, False, "cpu", 2, True),
    (None, True, "cpu", None, False), ("t2", False, "cpu", None, False), (None, False, "cpu", 1, False),
])
def test_the_planner_chooses_when_asked_or_when_nothing_is_named_on_several_devices(layout, pair, device, workers,
                                                                                   expected):
    assert wants_auto(layout, pair, device, workers) is expected
