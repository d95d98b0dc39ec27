"""The engine's stats travel between actors as one typed value, and keep the JSON forms that
`--metrics-json` and the daemon's stats reply have always had."""

from __future__ import annotations

import dataclasses

import orjson
from stats_example import ENGINE_STATS, ENGINE_STATS_JSON

from cli.client_commands import describe_stats
from seesaw import messages as m
from seesaw.config import ServeConfig
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.daemon_stats import DaemonRequests, DaemonStats, JobCounts, TokenCounts
from seesaw.frontend.report import write_metrics
from seesaw.frontend.server import Server
from seesaw.stats import KVUse, Timeline, Totals, Transition, to_json


def test_typed_stats_come_through_the_message_codec_whole():
    report = m.decode(m.encode(m.StatsReport(5, ENGINE_STATS)))
    assert report == m.StatsReport(5, ENGINE_STATS)
    assert type(report.stats.totals) is Totals and type(report.stats.kv) is KVUse
    assert type(report.stats.run.transitions[0]) is Transition and type(report.stats.timeline) is Timeline


def test_the_metrics_json_form_keeps_its_keys_and_values(tmp_path):
    write_metrics(tmp_path / "metrics.json", to_json(ENGINE_STATS))
    assert orjson.loads((tmp_path / "metrics.json").read_bytes()) == ENGINE_STATS_JSON
    assert list(to_json(ENGINE_STATS)) == list(ENGINE_STATS_JSON)  # in the same order, too


def test_parts_not_asked_for_are_left_out_of_the_json_form():
    run = dataclasses.replace(ENGINE_STATS.run, transitions=None)
    form = to_json(dataclasses.replace(ENGINE_STATS, run=run, timeline=None, host_buffer=None))
    assert form == {key: value for key, value in ENGINE_STATS_JSON.items()
                    if key not in ("transitions", "timeline", "host_buffer")}


DAEMON_STATS = DaemonStats(
    requests=DaemonRequests(done=7, failed=1, cancelled=2, rejected=0, busy=3, running=3, waiting=5, queued=4),
    tokens=TokenCounts(prompt=120, generated=64, cached=32), tokens_per_s=12.5, uptime_s=60.0, phases=["decode"],
    transitions=1, kv=ENGINE_STATS.kv, jobs=JobCounts(running=1), engine_failure=None)


def test_the_daemons_stats_reply_keeps_its_keys_and_values():
    assert to_json(DAEMON_STATS) == {
        "requests": {"done": 7, "failed": 1, "cancelled": 2, "rejected": 0, "busy": 3, "running": 3, "waiting": 5,
                     "queued": 4},
        "tokens": {"prompt": 120, "generated": 64, "cached": 32},
        "tokens_per_s": 12.5,
        "uptime_s": 60.0,
        "phases": ["decode"],
        "transitions": 1,
        "kv": {"device_blocks": 100, "device_blocks_used": 40, "host_blocks": 1000, "host_blocks_used": 250},
        "jobs": {"running": 1},
        "engine_failure": None,
    }


def test_the_daemons_stats_join_its_counts_with_the_engines(tmp_path):
    server = Server(None, ServeConfig(f"ipc://{tmp_path}/s.sock"), SamplingDefaults(), "m")
    server.counts["done"] = 7
    stats = server.stats(dataclasses.replace(ENGINE_STATS, failure="worker 0 died"))
    assert stats.requests == DaemonRequests(done=7, failed=0, cancelled=0, rejected=0, busy=0, running=3, waiting=5,
                                            queued=0)
    assert stats.tokens == TokenCounts(prompt=120, generated=64) and stats.kv == ENGINE_STATS.kv
    assert (stats.phases, stats.transitions, stats.jobs, stats.engine_failure) == (
        ["decode"], 1, JobCounts(running=0), "worker 0 died")


def test_the_stats_command_reads_the_daemons_reply():
    assert describe_stats("ipc:///tmp/s.sock", orjson.loads(orjson.dumps(to_json(DAEMON_STATS)))) == [
        "server:   ipc:///tmp/s.sock (up 60.0 s)",
        "requests: 3 running, 5 waiting, 4 queued, 7 done, 1 failed",
        "tokens:   120 prompt, 64 generated (12.5 tokens/s)",
        "phases:   decode (1 transitions)",
        "kv:       40/100 device blocks, 250/1000 host blocks",
        "jobs:     1 running",
    ]
