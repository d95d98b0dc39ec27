"""The engine's flags, declared once: `EngineOptions` holds them (each field is the flag's type, its
typer declaration and its default), `engine_flags` gives a command them, and `engine_config`
makes them the engine's configuration."""

from __future__ import annotations

import functools
import inspect
from copy import copy
from dataclasses import dataclass, fields
from typing import Annotated, Optional, get_args, get_type_hints

import typer

from seesaw.layout import Layout


@dataclass(frozen=True)
class EngineOptions:
    """What `batch`, `serve` and `calibrate` are told about the engine, as the flags say it."""

    model: Annotated[str, typer.Option("--model", "-m", help="'default' (SmolLM2-135M-Instruct), a .gguf file, a Hugging Face folder, or dummy:<preset>")] = "default"
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu"
    dtype: Annotated[Optional[str], typer.Option(help="float32 (CPU default), bfloat16 (CUDA default) or float16")] = None
    layout: Annotated[Optional[str], typer.Option(help="static mode: the one parallel layout (t1, t2, p2, d2, t2p2, ...); or auto: the planner simulates every layout and prefill->decode pair of this node for the job and runs the best (the default when more than one GPU is visible, or with --workers on a CPU; otherwise t1)")] = None
    workers: Annotated[Optional[int], typer.Option(help="--layout auto: how many workers it may use (default: every visible GPU; on a CPU, 1)")] = None
    prefill_layout: Annotated[Optional[str], typer.Option(help="seesaw mode: prefill in this layout (with --decode-layout)")] = None
    decode_layout: Annotated[Optional[str], typer.Option(help="seesaw mode: decode in this layout (with --prefill-layout)")] = None
    host_low_water: Annotated[float, typer.Option(help="seesaw mode: back to prefill once the host buffer is this empty (0-1)")] = 0.2
    prefill_min_fill: Annotated[float, typer.Option(help="seesaw mode: and once the waiting prompts would fill this share of the host buffer (0-1), or --prefill-max-wait passed, or decode has nothing left")] = 0.1
    prefill_max_wait: Annotated[float, typer.Option(help="seesaw mode: seconds the oldest waiting prompt may wait for a prefill phase while decode goes on")] = 30.0
    max_model_len: Annotated[Optional[int], typer.Option(help="cap on prompt + output tokens (default: the model's context)")] = None
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="token budget of one step, chunked prefill (default: 512 on CPU, 8192 on CUDA)")] = None
    max_num_seqs: Annotated[int, typer.Option(help="most requests running at once")] = 256
    block_size: Annotated[int, typer.Option(help="tokens per KV block")] = 16
    kv_cache_gb: Annotated[Optional[float], typer.Option(help="device KV pool per worker in GiB (CPU default 2)")] = None
    memory_fraction: Annotated[float, typer.Option(help="CUDA: share of GPU memory to use")] = 0.9
    host_buffer_gb: Annotated[str, typer.Option(help="host KV buffer in GiB, or auto: what /dev/shm and memory leave beside the weight store (capped at a batch job's whole KV; static mode: a worker's KV pool where known, at most 4 GiB per worker, as evicted requests wait there)")] = "auto"
    overlap: Annotated[bool, typer.Option("--overlap/--no-overlap", help="single-stage layouts: plan each step while the one before runs")] = True
    prefix_caching: Annotated[bool, typer.Option("--prefix-caching/--no-prefix-caching", help="keep full KV blocks and share them between requests with the same prompt prefix")] = True
    threads: Annotated[Optional[int], typer.Option(help="CPU threads per worker (default: cores / workers)")] = None
    seed: Annotated[int, typer.Option(help="seed for dummy weights")] = 0
    max_restarts: Annotated[int, typer.Option(help="replicas restarted after a worker is lost before the engine gives up")] = 3
    head_address: Annotated[Optional[str], typer.Option(help="tcp://HOST:PORT where workers on other hosts join (seesaw-cli worker)")] = None
    local_workers: Annotated[Optional[int], typer.Option(help="workers this host starts (default: the whole layout); the rest join remotely")] = None
    advertise_address: Annotated[Optional[str], typer.Option(help="this host's address as workers on other hosts reach it (default: the routed one)")] = None
    join_timeout: Annotated[float, typer.Option(help="seconds for every worker to join and form its groups before the run stops, saying why")] = 60.0


ENGINE_FLAGS = tuple(field.name for field in fields(EngineOptions))
JOINING = ("head_address", "local_workers", "advertise_address", "join_timeout")  # a head with workers on other hosts
ONE_HOST = tuple(name for name in ENGINE_FLAGS if name not in JOINING)  # the daemon's: every worker its own


def engine_flags(names: tuple[str, ...] = ENGINE_FLAGS, *, defaults: dict | None = None, helps: dict | None = None):
    """Give a command the engine flags `names` (a flag left out keeps its default), with its own
    `defaults` and `helps` where they differ. The command takes `options: EngineOptions`; typer sees
    each flag as a parameter in that parameter's place."""
    defaults, helps = defaults or {}, helps or {}
    declared = get_type_hints(EngineOptions, include_extras=True)
    flags = [
        inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(field.name, field.default),
                          annotation=_with_help(declared[field.name], helps.get(field.name)))
        for field in fields(EngineOptions) if field.name in names
    ]

    def give(command):
        own = inspect.signature(command, eval_str=True).parameters.values()
        parameters = [kept for parameter in own
                      for kept in (flags if parameter.name == "options" else [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)])]

        @functools.wraps(command)
        def run(**values):
            options = EngineOptions(**{flag.name: values.pop(flag.name) for flag in flags})
            return command(options=options, **values)

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return give


def _with_help(annotation, text: str | None):
    """`annotation` (Annotated[type, typer.Option(...)]) with its help text replaced, if `text` is given."""
    if text is None:
        return annotation
    kind, declared = get_args(annotation)
    option = copy(declared)
    option.help = text
    return Annotated[kind, option]


def layouts(options: EngineOptions) -> tuple[Layout, Layout | None] | None:
    """(layout, decode layout or None): static mode from --layout, seesaw mode from the pair, or
    None when the planner is to choose (--layout auto, or nothing named on a node of several devices)."""
    from .layout_choice import wants_auto

    if (options.prefill_layout is None) != (options.decode_layout is None):
        raise ValueError("--prefill-layout and --decode-layout go together (seesaw mode); "
                         "for one layout throughout use --layout")
    if options.workers is not None and options.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {options.workers}")
    pair = options.prefill_layout is not None
    if pair and options.layout is not None:
        raise ValueError("--layout is static mode (or auto); with --prefill-layout and --decode-layout leave it out")
    if wants_auto(options.layout, pair, options.device, options.workers):
        return None
    if options.workers is not None:
        raise ValueError("--workers is for --layout auto; a named layout says its own number of workers")
    if pair:
        return Layout.parse(options.prefill_layout), Layout.parse(options.decode_layout)
    return Layout.parse(options.layout or "t1"), None


def engine_config(options: EngineOptions, chosen: tuple[Layout, Layout | None] | None):
    """The engine's configuration for these flags, in the layouts `chosen` (None: t1 until the
    planner chooses)."""
    from seesaw.config import (
        CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, TransportConfig,
        default_cache_dir, default_token_budget,
    )

    layout, decode_layout = chosen or (Layout(), None)
    host_buffer_gb = _host_buffer_gb(options.host_buffer_gb)
    cache_dir = default_cache_dir()
    return EngineConfig(
        model=ModelConfig(model=options.model, device=options.device, dtype=options.dtype,
                          max_model_len=options.max_model_len, seed=options.seed),
        cache=CacheConfig(block_size=options.block_size, kv_cache_gb=options.kv_cache_gb,
                          memory_fraction=options.memory_fraction, host_buffer_gb=host_buffer_gb),
        parallel=ParallelConfig(layout=layout, decode_layout=decode_layout, threads_per_worker=options.threads,
                                num_local_workers=options.local_workers),
        transport=TransportConfig(head_address=options.head_address, max_restarts=options.max_restarts,
                                  advertise_address=options.advertise_address, join_timeout_s=options.join_timeout),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=options.max_num_batched_tokens or default_token_budget(options.device),
            max_num_seqs=options.max_num_seqs, host_low_water=options.host_low_water,
            prefill_min_fill=options.prefill_min_fill, prefill_max_wait_s=options.prefill_max_wait,
            overlap=options.overlap, prefix_caching=options.prefix_caching,
        ),
        cache_dir=cache_dir,
    )


def _host_buffer_gb(text: str) -> float | None:
    """--host-buffer-gb: a size in GiB, or None for auto."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--host-buffer-gb must be a size in GiB or auto, got {text!r}") from None
