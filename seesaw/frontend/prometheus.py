"""The daemon's stats as Prometheus text: on `--metrics-port` (loopback only), and at the HTTP
API's `/metrics`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from seesaw.frontend.daemon_stats import OUTCOMES, DaemonStats


class _StatsCollector:
    """Reads the stats `latest()` returns (the last ones built) each time it is scraped."""

    def __init__(self, latest: Callable[[], DaemonStats | None]):
        self.latest = latest

    def collect(self):
        stats = self.latest()
        if stats is None:
            return
        requests = CounterMetricFamily("seesaw_requests", "Requests answered, by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            requests.add_metric([outcome], getattr(stats.requests, outcome))
        yield requests
        for state in ("running", "waiting", "queued"):
            yield GaugeMetricFamily(f"seesaw_requests_{state}", f"Requests {state} now", getattr(stats.requests, state))
        tokens = CounterMetricFamily("seesaw_tokens", "Tokens processed, by kind", labels=["kind"])
        tokens.add_metric(["prompt"], stats.tokens.prompt)
        tokens.add_metric(["generated"], stats.tokens.generated)
        tokens.add_metric(["cached"], stats.tokens.cached)
        yield tokens
        if stats.tokens.prompt:
            yield GaugeMetricFamily("seesaw_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache",
                                    stats.tokens.cached / stats.tokens.prompt)
        yield GaugeMetricFamily("seesaw_generated_tokens_per_second", "Generation rate", stats.tokens_per_s)
        yield CounterMetricFamily("seesaw_transitions", "Phase transitions", stats.transitions)
        for name, value in asdict(stats.kv).items():
            yield GaugeMetricFamily(f"seesaw_kv_{name}", f"KV {name.replace('_', ' ')}", value)
        yield GaugeMetricFamily("seesaw_jobs_running", "Batch jobs running", stats.jobs.running)
        yield GaugeMetricFamily("seesaw_uptime_seconds", "Seconds since the server started", stats.uptime_s)


def _registry(latest: Callable[[], DaemonStats | None]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_StatsCollector(latest))
    return registry


def metrics_text(stats: DaemonStats | None) -> bytes:
    """`stats` in the Prometheus text format (empty before the first stats)."""
    return generate_latest(_registry(lambda: stats))


def serve_metrics(port: int, latest: Callable[[], DaemonStats | None]) -> Callable[[], None]:
    """Serve the stats `latest()` returns (the server's last stats reply) at
    http://127.0.0.1:PORT/metrics; returns the function that stops serving."""
    http_server, thread = start_http_server(port, addr="127.0.0.1", registry=_registry(latest))

    def stop() -> None:
        http_server.shutdown()
        http_server.server_close()
        thread.join(timeout=5)

    return stop
