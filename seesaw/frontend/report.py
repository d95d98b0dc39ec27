"""What a run did, for people: phase summary lines, the metrics as JSON, and a timeline picture
(matplotlib, an optional extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson

from seesaw.stats import EngineStats

GB = 1e9


def check_timeline_support() -> None:
    """Fail before any work is done if a timeline was asked for and cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--timeline needs matplotlib, an optional extra: pip install 'seesaw[plot]' "
                         "(or pip install matplotlib)")


def cache_line(stats: EngineStats) -> str | None:
    """The prefix cache's part of the closing summary, once prompts came in."""
    totals = stats.totals
    if totals.cache_hit_rate is None:
        return None
    line = (f"prefix cache: {totals.cache_hit_rate:.0%} of prompt tokens served from cache "
            f"({totals.cached_tokens} of {totals.prompt_tokens})")
    saved, loaded = totals.counters.get("host_shared_blocks", 0), totals.counters.get("load_shared_blocks", 0)
    if saved or loaded:
        line += f"; host buffer: {saved} blocks shared instead of saved, {loaded} found on the device instead of loaded"
    return line


def phase_lines(stats: EngineStats) -> list[str]:
    """The seesaw part of the closing summary: phases, transitions, KV traffic, batch sizes."""
    run, totals = stats.run, stats.totals
    seconds, steps = run.phase_seconds, run.steps
    phases = ", ".join(f"{name} {seconds.get(name, 0.0):.1f} s ({steps.get(name, 0)} steps)"
                       for name in ("prefill", "decode") if name in seconds)
    if seconds.get("transition"):
        phases += f", waiting for weights {seconds['transition']:.1f} s"
    lines = [f"phases:   {phases} (the time their steps ran)"]
    transitions = run.transitions or []
    if transitions:
        directions: dict[str, int] = {}
        for transition in transitions:
            directions[transition.direction] = directions.get(transition.direction, 0) + 1
        counted = ", ".join(f"{direction} x{count}" for direction, count in directions.items())
        loads = [t for t in transitions if t.num_bytes]
        line = f"transitions: {len(transitions)} ({counted})"
        if loads:
            line += (f"; per re-shard: drain {_mean([t.drain_s for t in loads]):.3f} s, weight load "
                     f"{_mean([t.load_s for t in loads]):.3f} s, {_mean([t.num_bytes for t in loads]) / 1e6:.0f} MB")
        lines.append(line)
    lines.append(
        f"KV:       written {totals.written_bytes / GB:.2f} GB at {_rate(totals.written_bytes, totals.written_s)}, "
        f"read {totals.read_bytes / GB:.2f} GB at {_rate(totals.read_bytes, totals.read_s)}"
    )
    lines.append(f"decode batch: mean {run.mean_decode_batch:.1f}, peak {run.peak_decode_batch}; "
                 f"host buffer peak {run.peak_host_fill:.0%} full")
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _rate(num_bytes: int, seconds: float) -> str:
    return f"{num_bytes / seconds / GB:.2f} GB/s" if seconds else "- GB/s"


def write_metrics(path: Path, metrics: dict) -> None:
    """The metrics in their JSON form (`seesaw.stats.to_json`) as a file."""
    path.write_bytes(orjson.dumps(metrics, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def draw_timeline(path: Path, metrics: dict) -> None:
    """One picture of the run: phases over time, decode batch size, host buffer fill, transitions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = metrics["timeline"]
    figure, (batch_axis, host_axis) = plt.subplots(2, 1, sharex=True, figsize=(10, 5.5))
    colours = {"prefill": "#f2c14e", "decode": "#5fa8d3", "mixed": "#cccccc", "transition": "#b04a4a"}
    for _, phase, start, stop in timeline["spans"]:  # each replica's phases as its steps ran them
        for axis in (batch_axis, host_axis):
            axis.axvspan(start, stop, color=colours[phase], alpha=0.25 / metrics["num_replicas"], linewidth=0)
    batch_axis.plot(timeline["at_s"], timeline["decode_rows"], ".", markersize=3, color="#1b4965")
    batch_axis.set_ylabel("decode batch (rows)")
    host_axis.plot(timeline["at_s"], [100 * fill for fill in timeline["host_fill"]], color="#8a5a44")
    host_axis.set_ylabel("host buffer (% full)")
    host_axis.set_ylim(0, 100)
    host_axis.set_xlabel("seconds since the engine was ready")
    for transition in metrics["transitions"]:
        for axis in (batch_axis, host_axis):
            axis.axvline(transition["at_s"], color="#333333", linewidth=0.6, linestyle="--")  # decided
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour, alpha=0.4) for colour in colours.values()]
    batch_axis.legend(handles, list(colours), loc="upper right", fontsize="small")
    batch_axis.set_title(f"{len(metrics['transitions'])} transitions (dashed: decided; red: waiting for weights)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
