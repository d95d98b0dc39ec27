"""`seesaw-cli plan` and `calibrate`: predict which layouts to run on a node with the simulator,
and measure this machine into a profile the simulator reads."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from .engine_options import EngineOptions, engine_flags

ProfilesOption = Annotated[Optional[list[Path]], typer.Option(
    "--profiles", help="extra profile files (JSON with gpus, links, node_links or models); calibrated ones are read too")]


def register(app: typer.Typer) -> None:
    """Add the commands to `app` (once: a second call changes nothing)."""
    if any((command.name or command.callback.__name__) == "plan" for command in app.registered_commands):
        return
    for command in (plan, calibrate):
        app.command()(command)


def plan(
    model: Annotated[str, typer.Option("--model", "-m", help="a model profile (llama2-70b, codellama-34b, llama3-15b, a dummy preset) or a folder with config.json")],
    gpus: Annotated[str, typer.Option(help="the node: COUNTxGPU, e.g. 8xL4, 4xA10, 8xH100-SXM")],
    workload: Annotated[str, typer.Option(help="arxiv, sharegpt, fixed:IN:OUT, or a JSONL file of lengths or batch lines")] = "sharegpt",
    interconnect: Annotated[Optional[str], typer.Option(help="pcie4x8, pcie4x16, pcie5x16, nvlink (default: the GPU's usual one)")] = None,
    host_memory_gb: Annotated[Optional[float], typer.Option(help="the node's host memory in GiB (default: the GPU profile's per-GPU figure times the count)")] = None,
    num_requests: Annotated[int, typer.Option(help="requests drawn from a built-in workload")] = 1000,
    seed: Annotated[int, typer.Option(help="seed for the built-in workloads")] = 0,
    shared_prefix: Annotated[int, typer.Option(help="tokens of a system prompt put in front of every prompt of the workload (its KV is computed once and shared)")] = 0,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="token budget of one step (default: the GPU profile's)")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="most requests running at once")] = 256,
    host_buffer_gb: Annotated[Optional[float], typer.Option(help="host KV buffer in GiB (default: auto, as the engine sizes it: what /dev/shm and memory leave, at most the workload's KV)")] = None,
    shm_gb: Annotated[Optional[float], typer.Option(help="the size of /dev/shm on the node in GiB (default: half its host memory, as Linux mounts it)")] = None,
    all_reduce_gbs: Annotated[Optional[str], typer.Option(help="ring all-reduce bus bandwidth by group size, SIZE=GB/s,... (for example 2=10,4=8,8=3.2; default: the link's measured figures, else its copy bandwidth)")] = None,
    nodes: Annotated[int, typer.Option(help="identical nodes of --gpus to plan for: one engine over them: a node's layout or pair on each, or pipeline stages across nodes")] = 1,
    node_link: Annotated[Optional[str], typer.Option(help="the link between nodes: eth25g, eth100g, ib200g, ib400g (default with --nodes: eth100g)")] = None,
    profiles: ProfilesOption = None,
    jobs: Annotated[int, typer.Option(help="simulations run at once (processes)")] = max(1, os.cpu_count() or 1),
    top: Annotated[int, typer.Option(help="rows of the ranking to print (0: all)")] = 0,
    output_json: Annotated[Optional[Path], typer.Option(help="write the ranking as JSON")] = None,
    timeline: Annotated[Optional[Path], typer.Option(help="draw the simulated run of the best pair (or, with none, the best layout) into this PNG (needs matplotlib)")] = None,
) -> None:
    """Rank every static layout and every prefill->decode pair of a node (or of --nodes identical
    nodes) by simulated throughput."""
    from seesaw.frontend.output import check_folder
    from seesaw.sim import planner
    from seesaw.sim.catalog import DEFAULT_NODE_LINK, parse_all_reduce, with_all_reduce
    from seesaw.sim.cost import CostModel

    try:
        catalog = _catalog(profiles)
        node = catalog.node(gpus, interconnect, host_memory_gb, shm_gb)
        if all_reduce_gbs is not None:
            node = with_all_reduce(node, parse_all_reduce(all_reduce_gbs))
        spec = catalog.model(model)
        requests, refused = _workload(workload, num_requests, seed, spec.max_position, model, shared_prefix)
        if timeline is not None:
            from seesaw.frontend.report import check_timeline_support

            check_timeline_support()
        for flag, value, lowest in (("--max-num-batched-tokens", max_num_batched_tokens, 1),
                                    ("--max-num-seqs", max_num_seqs, 1), ("--jobs", jobs, 1),
                                    ("--host-buffer-gb", host_buffer_gb, 0), ("--nodes", nodes, 1)):
            if value is not None and value < lowest:
                raise ValueError(f"{flag} must be at least {lowest}, got {value}")
        if node_link is not None and nodes == 1:
            raise ValueError(f"--node-link {node_link} joins nodes: give --nodes 2 or more with it")
        link = catalog.node_link(node_link or DEFAULT_NODE_LINK) if nodes > 1 else None
        options = planner.PlanOptions(token_budget=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      host_buffer_gb=host_buffer_gb, num_nodes=nodes)
        check_folder("--output-json", output_json)
        check_folder("--timeline", timeline)
    except ValueError as error:
        _fail(str(error))
    cost = CostModel(spec, node, link)
    typer.echo(f"node: {node}, host memory {node.host_memory_gb:.0f} GiB; model {model} "
               f"({cost.model_bytes / node.gpu.dtype_bytes / 1e9:.1f}B parameters at {node.gpu.dtype_bytes} bytes)")
    if link is not None:
        typer.echo(f"nodes: {nodes} of them, joined by {link.name} ({link.bandwidth_gbs:g} GB/s one way per node, "
                   f"{link.latency_us:g} us); tokens/s below are the whole cluster's")
    typer.echo(f"workload: {requests.describe()}{f', dealt to the {nodes} nodes' if nodes > 1 else ''}")
    typer.echo(f"host KV buffer: {_buffers(planner, cost, options, requests)}")
    try:
        ranked = planner.plan(cost, requests, options, jobs=jobs)
    except RuntimeError as error:
        _fail(str(error))
    _print_ranking(ranked, top)
    static, pair = planner.best(ranked, False), planner.best(ranked, True)
    if static is not None and pair is not None:
        typer.echo(f"\nbest static: {static.name} ({static.throughput:.0f} tokens/s); best pair: {pair.name} "
                   f"({pair.throughput:.0f} tokens/s), {pair.throughput / static.throughput:.2f}x")
    choice = planner.choose(ranked)
    if choice is None:
        _fail("no layout of this node can run this model and workload")
    typer.echo(choice.describe())
    winner = choice.best if options.host_buffer_gb is not None else planner.right_sized(cost, choice.best, requests)
    command = planner.batch_command(winner, model, node.gpu)
    steps = planner.node_commands(winner, model, node.gpu, node.num_gpus) if nodes > 1 else []
    if steps:
        typer.echo(f"run the best on {nodes} nodes:")
        for where, line in steps:
            typer.echo(f"  {where}:\n    {line}")
    else:
        typer.echo(f"run the best:\n  {command}")
    notes = planner.host_memory_notes(winner, cost)
    for note in notes:
        typer.echo(f"  note: {note}{' (on each node)' if winner.spec.num_nodes > 1 else ''}")
    if output_json is not None:
        rows = [{"run": c.name, "error": c.error, "host_buffer_gb": c.spec.host_buffer_gb and round(c.spec.host_buffer_gb, 1),
                 **(c.result.summary() if c.result else {})} for c in ranked]
        left_out = {"bad_lines": list(requests.left_out), "longer_than_context": refused}
        joined = None if link is None else {"name": link.name, "bandwidth_gbs": link.bandwidth_gbs,
                                            "efficiency": link.efficiency, "latency_us": link.latency_us}
        cluster = {"commands": [{"on": where, "run": line} for where, line in steps]} if steps else {}
        output_json.write_text(json.dumps({"node": str(node), "nodes": nodes, "node_link": joined, "model": model,
                                           "workload": requests.describe(), "left_out": left_out, "best": winner.name,
                                           "command": command, **cluster, "notes": notes, "ranking": rows}, indent=2))
    if timeline is not None:
        from seesaw.frontend.report import draw_timeline

        drawn = pair or winner  # a node of one GPU has no pair: its best layout's run
        draw_timeline(timeline, drawn.result.metrics())
        typer.echo(f"timeline of {drawn.name}{'' if pair else ' (no prefill->decode pair runs here)'}: {timeline}")


def _buffers(planner, cost, options, requests) -> str:
    """The host buffers static layouts and pairs get, and why, in one line."""
    from seesaw.layout import Layout
    from seesaw.sim.simulator import RunSpec

    count, nodes = cost.node.num_gpus, options.num_nodes
    base = RunSpec(Layout(pp=count), host_buffer_gb=options.host_buffer_gb, block_size=options.block_size,
                   max_model_len=cost.spec.max_position)
    if nodes > 1:
        runs = [("static layouts over the nodes", replace(base, layout=Layout(pp=count * nodes), num_nodes=nodes))]
        base = replace(base, layout=Layout(dp=nodes, pp=count), num_nodes=nodes)
    else:
        runs = [("static layouts", base)]
    if count > 1:  # one GPU has one layout: no pairs
        decode = Layout(dp=nodes, tp=count)
        runs.append(("pairs" if nodes == 1 else "pairs, on each node", replace(base, decode_layout=decode)))
    parts = []
    for what, run in runs:
        try:
            sized = planner.host_buffer_for(cost, run, requests)
            parts.append(f"{sized.gib:.1f} GiB for {what}" if sized.num_bytes or run.num_nodes == 1
                         else f"none for {what} (simulated recomputing what they evict)")
        except ValueError as error:
            parts.append(f"none for {what} ({error})")
    how = "as given" if options.host_buffer_gb is not None else "auto, as the engine sizes it on such a node"
    return f"{', '.join(parts)} ({how})"


def _print_ranking(ranked, top: int) -> None:
    from seesaw.sim.planner import best

    static = best(ranked, False)
    base = static.throughput if static else 0.0
    runnable = [c for c in ranked if c.result is not None]
    shown = runnable[: top or None]
    width = max([12, *(len(c.name) for c in shown)])
    typer.echo(f"{'rank':>4}  {'run':<{width}} {'time s':>9} {'tokens/s':>9} {'output/s':>9} {'vs static':>9} "
               f"{'switches':>8} {'reload s':>8} {'host peak':>9}")
    for rank, candidate in enumerate(shown, 1):
        r = candidate.result
        ratio = f"{candidate.throughput / base:.2f}x" if base else "-"
        failed = f"  ({r.num_failed} requests cannot fit)" if r.num_failed else ""
        typer.echo(f"{rank:>4}  {candidate.name:<{width}} {r.elapsed_s:>9.1f} {r.total_tokens_per_s:>9.0f} "
                   f"{r.output_tokens_per_s:>9.0f} {ratio:>9} {len(r.transitions):>8} {r.reload_s:>8.2f} "
                   f"{100 * r.host_peak_fraction:>8.0f}%{failed}")
    for candidate in ranked:
        if candidate.error:
            typer.echo(f"cannot run {candidate.name}: {candidate.error}")


@engine_flags(("model", "device"), defaults={"model": "dummy:tiny"}, helps={
    "model": "the model whose engine steps time the per-step overhead",
    "device": "cpu (workers share the cores) or cuda (device 0, against its catalogue entry's datasheet)"})
def calibrate(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="profile file to write (default: ~/.cache/seesaw/profiles/NAME.json)")] = None,
    name: Annotated[Optional[str], typer.Option(help="name of the device and link profiles written (default: local-cpu; on CUDA the catalogue entry's, which it then stands in for)")] = None,
    like: Annotated[Optional[str], typer.Option(help="cuda: the catalogue entry whose datasheet peaks the device has (default: found from its name)")] = None,
    workers: Annotated[Optional[str], typer.Option(help="cpu: worker counts to profile, comma-separated (each worker gets cores / count threads)")] = None,
    options: EngineOptions = EngineOptions(),
) -> None:
    """Measure this machine (matmul and copy rates, all-reduce and send/recv over gloo, the engine's
    step overhead), fit the result to real engine runs, and write a profile `plan` and the simulator
    read. With --device cuda, CUDA device 0 is measured and fitted instead."""
    from seesaw.config import default_cache_dir
    from seesaw.frontend.output import check_folder

    model, device = options.model, options.device
    if device not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got {device!r}")
    try:
        check_folder("--output", output)  # before minutes of measuring
    except ValueError as error:
        _fail(str(error))
    if device == "cuda":
        if workers is not None:
            _fail("--workers is for --device cpu: a CUDA calibration measures one device")
        from seesaw.calibrate.measure_gpu import calibrate_cuda

        try:
            profile = calibrate_cuda(like, name, log=lambda line: typer.echo(line, err=True), overhead_model=model)
        except ValueError as error:
            _fail(str(error))
    else:
        if like is not None:
            _fail("--like is for --device cuda")
        try:
            counts = [int(part) for part in ("1,2" if workers is None else workers).split(",")]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            _fail(f"--workers {workers!r}: give positive worker counts such as 1,2")
        from seesaw.calibrate.measure import calibrate as measure

        name = name or "local-cpu"
        profile = measure(name, counts, model, log=lambda line: typer.echo(line, err=True))
    label = next(iter(profile["gpus"])) if device == "cuda" else name
    path = output or default_cache_dir() / "profiles" / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    typer.echo(f"wrote {path}: devices {', '.join(profile['gpus'])}; links {', '.join(profile['links'])}")


def _catalog(profiles: list[Path] | None):
    from seesaw.config import default_cache_dir
    from seesaw.sim.catalog import Catalog

    calibrated = sorted((default_cache_dir() / "profiles").glob("*.json"))
    return Catalog([*calibrated, *(profiles or [])])


def _workload(name: str, num_requests: int, seed: int, max_model_len: int, model: str, shared_prefix: int = 0):
    """The workload to plan for, and how many of its requests the model's context cannot take (left
    out and said so, as are a file's bad lines)."""
    from seesaw.sim import workload

    if num_requests < 1:
        raise ValueError(f"--num-requests must be positive, got {num_requests}")
    if shared_prefix < 0:
        raise ValueError(f"--shared-prefix must not be negative, got {shared_prefix}")
    named = workload.named(name, num_requests, seed, tokenize=_batch_lengths(max_model_len, model))
    requests, refused = workload.within_context(workload.with_shared_prefix(named, shared_prefix), max_model_len)
    if requests.left_out:
        shown = 5
        typer.echo(f"left out: {len(requests.left_out)} bad lines of {name}", err=True)
        for reason in requests.left_out[:shown]:
            typer.echo(f"  {reason}", err=True)
        if len(requests.left_out) > shown:
            typer.echo(f"  and {len(requests.left_out) - shown} more", err=True)
    if refused and not requests.num_requests:
        raise ValueError(f"no request of {name} fits the model's context of {max_model_len} tokens")
    if refused:
        typer.echo(f"left out: {refused} requests longer than the model's context of {max_model_len} tokens "
                   "(the engine would refuse them)", err=True)
    return requests, refused


def _batch_lengths(max_model_len: int, model: str):
    """Lengths of a batch-file line, by tokenizing its prompt with the model's tokenizer (its
    folder's, else the default model's), loaded on the first batch line."""
    codecs: list = []

    def lengths(entry: dict, where: str) -> tuple[int, int]:
        from seesaw.frontend.batch_lengths import batch_line_lengths, codec_for

        if not codecs:
            codecs.append(codec_for(model, log=lambda line: typer.echo(line, err=True)))
        return batch_line_lengths(entry, where, codecs[0], max_model_len)

    return lengths


def _fail(message: str):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
