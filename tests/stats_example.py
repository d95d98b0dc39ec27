"""A known EngineStats, every part filled in, and its JSON form written out by hand (the keys and
values `--metrics-json` has always written)."""

from __future__ import annotations

from seesaw.stats import EngineStats, HostBufferUse, KVUse, RequestCounts, RunSummary, Timeline, Totals, Transition

ENGINE_STATS = EngineStats(
    run=RunSummary(elapsed_s=12.5, first_phase="prefill", num_replicas=1, phase_seconds={"prefill": 3.0, "decode": 7.5},
                   steps={"prefill": 4, "decode": 30}, mean_decode_batch=6.5, peak_decode_batch=8, peak_host_fill=0.75,
                   replica_restarts=0, num_transitions=1,
                   transitions=[Transition(0, "decode", "p2->t2", 3.0, 0.1, 0.2, 4096, 2, 3.3)]),
    totals=Totals(compute_s=9.0, requests_added=8, prompt_tokens=120, generated_tokens=64, written_bytes=8192,
                  written_s=0.5, read_bytes=4096, read_s=0.25, decode_steps=29, decode_s=7.0, decode_rows=190,
                  decode_context_tokens=5000, counters={"steps": 34, "evictions": 2, "transitions": 1}),
    requests=RequestCounts(running=3, waiting=5),
    kv=KVUse(device_blocks=100, device_blocks_used=40, host_blocks=1000, host_blocks_used=250),
    phases=["decode"],
    failure=None,
    timeline=Timeline(at_s=[0.0, 1.0], replica=[0, 0], phase=["prefill", "decode"], decode_rows=[0, 8],
                      host_fill=[0.5, 0.75], spans=[[0, "prefill", 0.0, 3.0], [0, "decode", 3.3, 12.5]]),
    host_buffer=HostBufferUse(gib=1.5, reason="asked for", pin_s=0.0),
)

ENGINE_STATS_JSON = {
    "elapsed_s": 12.5, "first_phase": "prefill", "num_replicas": 1,
    "phase_seconds": {"prefill": 3.0, "decode": 7.5}, "steps": {"prefill": 4, "decode": 30},
    "mean_decode_batch": 6.5, "peak_decode_batch": 8, "peak_host_fill": 0.75, "replica_restarts": 0,
    "num_transitions": 1,
    "transitions": [{"replica": 0, "phase": "decode", "direction": "p2->t2", "at_s": 3.0, "drain_s": 0.1,
                     "load_s": 0.2, "num_bytes": 4096, "num_workers_done": 2, "reloaded_at_s": 3.3}],
    "totals": {"compute_s": 9.0, "requests_added": 8, "prompt_tokens": 120, "generated_tokens": 64,
               "written_bytes": 8192, "written_s": 0.5, "read_bytes": 4096, "read_s": 0.25, "decode_steps": 29,
               "decode_s": 7.0, "decode_rows": 190, "decode_context_tokens": 5000,
               "steps": 34, "evictions": 2, "transitions": 1},
    "requests": {"running": 3, "waiting": 5},
    "kv": {"device_blocks": 100, "device_blocks_used": 40, "host_blocks": 1000, "host_blocks_used": 250},
    "phases": ["decode"],
    "failure": None,
    "timeline": {"at_s": [0.0, 1.0], "replica": [0, 0], "phase": ["prefill", "decode"], "decode_rows": [0, 8],
                 "host_fill": [0.5, 0.75], "spans": [[0, "prefill", 0.0, 3.0], [0, "decode", 3.3, 12.5]]},
    "host_buffer": {"gib": 1.5, "reason": "asked for", "pin_s": 0.0},
}
