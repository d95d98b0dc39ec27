"""`seesaw-cli`: run a batch file through the engine."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from seesaw.protocol_terms import MAX_FRAME_BYTES

from .client_commands import register as register_client_commands
from .engine_options import ONE_HOST, EngineOptions, engine_config, engine_flags, layouts
from .plan_commands import register as register_plan_commands

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Seesaw: throughput-first LLM inference.")

MaxTokensOption = Annotated[int, typer.Option(help="max_tokens for requests that do not set it")]
TemperatureOption = Annotated[float, typer.Option(help="temperature for requests that do not set it (0 = greedy)")]
TopPOption = Annotated[float, typer.Option(help="top_p for requests that do not set it")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="log engine events")]


@app.callback()
def main() -> None:
    """Seesaw: throughput-first LLM inference."""


@app.command()
@engine_flags(helps={"seed": "seed for dummy weights; lines without a seed sample with one derived from it and their custom_id"})
def batch(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT.jsonl", help="OpenAI batch lines or simple {\"prompt\"|\"messages\"} lines")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="where results go (default: INPUT.results.jsonl)")] = None,
    options: EngineOptions = EngineOptions(),
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = 1.0,
    top_p: TopPOption = 1.0,
    max_pending: Annotated[int, typer.Option(help="requests in the engine ahead of the results; as many lines again are read ahead to order by shared prompt prefix")] = 4096,
    resume: Annotated[bool, typer.Option("--resume", help="finish an earlier run: skip every custom_id already in the output")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output instead of refusing")] = False,
    errors: Annotated[Optional[Path], typer.Option(help="write failed lines here instead of into the output")] = None,
    grace_s: Annotated[float, typer.Option(help="on SIGINT/SIGTERM: seconds the requests in flight get to finish")] = 30.0,
    metrics_json: Annotated[Optional[Path], typer.Option(help="write the run's metrics (phases, transitions, KV traffic) here as JSON")] = None,
    timeline: Annotated[Optional[Path], typer.Option(help="draw the run's timeline into this PNG (needs matplotlib)")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run every line of INPUT.jsonl; write one OpenAI batch output line per request as it finishes."""
    _setup_logging(verbose)
    if not input_path.is_file():
        _fail(f"input file {input_path} not found")
    output = output or input_path.with_name(input_path.name.removesuffix(".jsonl") + ".results.jsonl")
    started = time.perf_counter()
    try:
        chosen = layouts(options)
        config = engine_config(options, chosen)
        defaults = _sampling_defaults(max_tokens, temperature, top_p, options.seed)
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if grace_s < 0:
            raise ValueError(f"grace_s must not be negative, got {grace_s}")
        if timeline is not None:
            from seesaw.frontend.report import check_timeline_support

            check_timeline_support()
        job = _job(input_path, output, errors, resume, overwrite, defaults, max_pending, grace_s, metrics_json, timeline)
        resolved, codec = _model(config)
        from seesaw.frontend.job_profile import read_job

        from .layout_choice import planned, warn_if_pair_loses

        profile = read_job(input_path, defaults, codec, config.model.context_length(resolved.spec.max_position))
        if chosen is None:
            config = planned(config, resolved.spec, options.workers, _say, profile=profile, name=input_path.name)
        elif config.parallel.is_seesaw:
            warn_if_pair_loses(config, resolved.spec, profile, input_path.name, _say)
        engine = _engine(config, resolved, codec, job_kv_blocks=profile.kv_blocks(config.cache.block_size))
    except (ValueError, OSError) as error:
        _fail(str(error))
    from seesaw.frontend.batch_job import run_job

    with job.sink:
        result = _run(run_job(engine, job, started))
    typer.echo(f"results: {output}", err=True)
    raise typer.Exit(result.exit_code)


@app.command()
@engine_flags(ONE_HOST)
def serve(
    bind: Annotated[Optional[str], typer.Option(help="where clients connect: ipc://PATH or tcp://HOST:PORT (default: an ipc socket in the user's runtime folder)")] = None,
    curve_secret_key: Annotated[Optional[Path], typer.Option(help="CURVE secret key (from `seesaw-cli keys`); required for a tcp address other hosts can reach")] = None,
    options: EngineOptions = EngineOptions(),
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = 1.0,
    top_p: TopPOption = 1.0,
    max_queued: Annotated[int, typer.Option(help="requests held at once; past this clients get 'busy' and retry")] = 4096,
    max_jobs: Annotated[int, typer.Option(help="batch jobs at once; past this clients get 'busy'")] = 16,
    max_frame_bytes: Annotated[int, typer.Option(help="larger client frames are dropped at the socket")] = MAX_FRAME_BYTES,
    drain_timeout: Annotated[float, typer.Option(help="on SIGTERM/SIGINT: seconds the requests in flight get to finish")] = 60.0,
    metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")] = None,
    http: Annotated[Optional[str], typer.Option(help="serve the OpenAI HTTP API at HOST:PORT (then the ZeroMQ socket only if --bind is given too)")] = None,
    api_key: Annotated[Optional[list[str]], typer.Option(help="an API key the HTTP API takes as a Bearer token (repeatable); required off loopback")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="a file of API keys, one a line")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="where the HTTP API keeps files and batches (default: ~/.local/share/seesaw)")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="larger HTTP request bodies get 413")] = MAX_FRAME_BYTES,
    max_upload_bytes: Annotated[int, typer.Option(help="larger uploaded files get 413")] = 512 << 20,
    max_batches: Annotated[int, typer.Option(help="batches running at once; past this creating one gets 429")] = 4,
    max_streams: Annotated[int, typer.Option(help="streamed answers at once; past this they get 429")] = 256,
    read_timeout: Annotated[float, typer.Option(help="seconds an HTTP body (an upload's too) may take to arrive, or stall, before 408")] = 30.0,
    verbose: VerboseOption = False,
) -> None:
    """Load the model once and serve requests and batch jobs until stopped: on a ZeroMQ socket, and
    with --http the OpenAI HTTP API (chat, completions, files, batches) and a page to watch them."""
    _setup_logging(verbose)
    started = time.perf_counter()
    try:
        from seesaw.config import ServeConfig
        from seesaw.transport.curve import default_address

        http_config = None
        if http is not None:
            http_config = _http_config(http, api_key or [], api_key_file, data_dir, max_body_bytes, max_upload_bytes,
                                       max_batches, max_streams, read_timeout)
        serving = ServeConfig(
            address=bind or (default_address() if http is None else None), curve_secret_key=curve_secret_key,
            max_queued=max_queued, max_jobs=max_jobs, max_frame_bytes=max_frame_bytes, drain_timeout_s=drain_timeout,
            metrics_port=metrics_port, http=http_config,
        )
        if curve_secret_key is not None:
            from seesaw.transport.curve import read_secret

            read_secret(curve_secret_key)  # a bad key file is an error now, not after the model loads
        chosen = layouts(options)
        config = engine_config(options, chosen)
        defaults = _sampling_defaults(max_tokens, temperature, top_p, options.seed)
        resolved, codec = _model(config)
        if chosen is None:  # a daemon's job is not known yet: plan for a chat-like mix
            from .layout_choice import planned

            config = planned(config, resolved.spec, options.workers, _say)
        engine = _engine(config, resolved, codec)
    except (ValueError, OSError) as error:
        _fail(str(error))
    from seesaw.frontend.serve_job import run_server

    raise typer.Exit(_run(run_server(engine, serving, defaults, started)))


def _http_config(address, keys, key_file, data_dir, max_body_bytes, max_upload_bytes, max_batches, max_streams,
                 read_timeout):
    """The HTTP API's configuration, its keys read (from the flags and the key file) and checked now."""
    from seesaw.config import HttpConfig, default_data_dir, parse_host_port

    keys = list(keys)
    if key_file is not None:
        keys += [line.strip() for line in key_file.read_text().splitlines() if line.strip()]
        if not keys:
            raise ValueError(f"--api-key-file {key_file} holds no key")
    host, port = parse_host_port(address)
    data_dir = data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made is an error now, not after loading
    return HttpConfig(host=host, port=port, data_dir=data_dir, api_keys=tuple(keys),
                      max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes, max_batches=max_batches,
                      max_streams=max_streams, read_timeout_s=read_timeout)


def _job(input_path, output, errors, resume, overwrite, defaults, max_pending, grace_s, metrics_json, timeline):
    """The batch job, its output checked (and, on resume, scanned and repaired) before the model loads."""
    from seesaw.frontend.batch_job import BatchJob
    from seesaw.frontend.output import KeySet, ResultSink, check_folder, check_output, finished_ids

    for flag, path in (("--output", output), ("--errors", errors), ("--metrics-json", metrics_json),
                       ("--timeline", timeline)):
        check_folder(flag, path)
    finished = KeySet()
    for path in (output, errors):
        if path is not None:
            check_output(path, resume, overwrite)
    sink = ResultSink(output, errors, append=resume)  # locks the files before a resume reads them
    for path in (output, errors) if resume else ():
        if path is None:
            continue
        done, count = finished_ids(path)
        finished.update(done)
        if count:
            typer.echo(f"resuming: {count} results already in {path}", err=True)
    return BatchJob(input_path, output, sink, finished, defaults, max_pending, grace_s, metrics_json, timeline,
                    argv=sys.argv[1:])


def _model(config):
    """The model found (and converted once) and its tokenizer, which measures a job's prompts before
    the engine starts and is then the engine's."""
    from seesaw.text import TextCodec
    from seesaw.model.resolve import resolve_model

    resolved = resolve_model(config.model.model, config.cache_dir)
    if resolved.convert_s:
        typer.echo(f"converted {resolved.name} in {resolved.convert_s:.1f} s (cached for later runs)", err=True)
    return resolved, TextCodec(resolved.tokenizer_folder)


def _sampling_defaults(max_tokens: int, temperature: float, top_p: float, seed: int):
    from seesaw.frontend.batch_io import SamplingDefaults
    from seesaw.sampling import SamplingParams

    SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)  # checked as it is made
    return SamplingDefaults(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def worker(
    head: Annotated[Optional[str], typer.Option(help="the head's address, tcp://HOST:PORT (its --head-address); default: $SEESAW_HEAD")] = None,
    rank: Annotated[Optional[int], typer.Option(help="rank to take (default: $SLURM_PROCID or $RANK when set, else the head assigns one)")] = None,
    local_rank: Annotated[Optional[int], typer.Option(help="which of this host's GPUs to use (default: LOCAL_RANK or SLURM_LOCALID, else the first one no other worker here holds)")] = None,
    advertise_address: Annotated[Optional[str], typer.Option(help="this host's address as the head and the other workers reach it (default: the interface toward the head)")] = None,
    join_timeout: Annotated[float, typer.Option(help="seconds to wait for the head before giving up, saying why")] = 60.0,
    head_timeout: Annotated[float, typer.Option(help="seconds without a word from the head (which speaks every second) before this worker exits, releasing its node's shared memory")] = 60.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log worker events")] = False,
) -> None:
    """Join a head on another host as one worker; exits when the head shuts down."""
    import os

    from seesaw.worker import WorkerOptions, main as worker_main

    head = head or os.environ.get("SEESAW_HEAD")
    if not head:
        _fail("give the head's address: --head tcp://HOST:PORT, or SEESAW_HEAD")
    if head_timeout < 2 or join_timeout <= 0:
        _fail(f"--head-timeout must be at least 2 s (got {head_timeout:g}) and --join-timeout positive "
              f"(got {join_timeout:g})")
    if rank is None:
        launched = next((os.environ[name] for name in ("SLURM_PROCID", "RANK") if os.environ.get(name, "").isdigit()), None)
        rank = int(launched) if launched is not None else None
    raise typer.Exit(worker_main(WorkerOptions(
        head=head, rank=rank, local_rank=local_rank, advertise_address=advertise_address, join_timeout_s=join_timeout,
        head_timeout_s=head_timeout, log_level="INFO" if verbose else "WARNING",
    )))


def _engine(config, resolved, codec, job_kv_blocks: int | None = None):
    """The engine for `config`, its layout checked and its host buffer sized (the size said in one line)."""
    from seesaw.engine import Engine

    engine = Engine(config, resolved, codec, job_kv_blocks=job_kv_blocks)
    if engine.host_buffer_plan is not None:
        typer.echo(engine.host_buffer_plan.reason, err=True)
    return engine


def _run(coroutine):
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


register_client_commands(app)
register_plan_commands(app)

if __name__ == "__main__":
    app()
