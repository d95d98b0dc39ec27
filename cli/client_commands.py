"""`seesaw-cli submit`, `status` and `keys`: the commands that talk to a running daemon, or set up
its CURVE keys."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import orjson
import typer

from seesaw.client import Client, ServerError
from seesaw.protocol_terms import MAX_FRAME_BYTES
from seesaw.transport.curve import default_address, no_socket_hint, write_keys

ServerOption = Annotated[Optional[str], typer.Option("--server", help="the daemon's address (default: its ipc socket)")]
ServerKeyOption = Annotated[Optional[str], typer.Option(
    "--server-key", help="the server's public key: DIR/server.key or its Z85 text (needed off this host)")]


def register(app: typer.Typer) -> None:
    """Add the commands to `app` (once: a second call changes nothing)."""
    if any((command.name or command.callback.__name__) == "submit" for command in app.registered_commands):
        return
    for command in (submit, status, keys):
        app.command()(command)


def submit(
    input_path: Annotated[Path, typer.Argument(metavar="FILE", help="the batch file (JSONL), as `seesaw-cli batch` takes it")],
    server: ServerOption = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="where results go (default: FILE.results.jsonl)")] = None,
    server_key: ServerKeyOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output instead of refusing")] = False,
    timeout_s: Annotated[float, typer.Option(help="give up when the daemon sends nothing for this long")] = 600.0,
) -> None:
    """Run FILE as a batch job on a running daemon; write each result line as it arrives."""
    address = server or default_address()
    output = output or input_path.with_name(input_path.name.removesuffix(".jsonl") + ".results.jsonl")
    _check_files(input_path, output, overwrite)
    source = job_source(address, input_path)
    started = time.perf_counter()
    with _terminate_as_interrupt(), _client(address, server_key, timeout_s) as client, _results(output) as sink:
        job = client.run_job(**source)
        try:
            for line in job:
                sink.write(orjson.dumps(line) + b"\n")
                sink.flush()
        except ValueError as error:  # the lines make too large a frame
            _fail(str(error))
        except (ServerError, TimeoutError, ConnectionError) as error:
            _fail(f"{error} (the lines answered so far are in {output})", code=1)
    summary = job.summary or {}
    typer.echo(f"{summary.get('num_done', 0)} done, {summary.get('num_failed', 0)} failed, "
               f"{summary.get('num_cancelled', 0)} cancelled in {time.perf_counter() - started:.1f} s; "
               f"results: {output}", err=True)
    raise typer.Exit(0 if summary and not summary.get("num_cancelled") else 1)


def job_source(address: str, input_path: Path) -> dict:
    """How the daemon gets the file: its path on an ipc socket (the daemon runs on this host, as
    this user), else the lines inline (refused past what one frame takes)."""
    if address.startswith("ipc://"):
        return {"path": input_path.resolve()}
    size_bytes = input_path.stat().st_size
    if size_bytes > MAX_FRAME_BYTES:
        _fail(f"{input_path} is {size_bytes / 2**20:.1f} MiB; a daemon on another host takes at most "
              f"{MAX_FRAME_BYTES // 2**20} MiB inline: split it (e.g. `split -l 20000 {input_path.name}`) "
              f"and submit the parts")
    try:
        return {"lines": input_path.read_text().splitlines()}
    except (OSError, UnicodeDecodeError) as error:
        _fail(f"cannot read {input_path}: {error}")


def status(
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the stats as JSON")] = False,
    timeout_s: Annotated[float, typer.Option(help="give up when the daemon does not answer within this")] = 10.0,
) -> None:
    """Print what a running daemon is doing: requests, tokens, phases, KV blocks, jobs."""
    address = server or default_address()
    with _client(address, server_key, timeout_s) as client:
        try:
            stats = client.stats()
        except (ServerError, TimeoutError, ConnectionError) as error:
            _fail(str(error), code=1)
    if as_json:
        typer.echo(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo("\n".join(describe_stats(address, stats)))


def describe_stats(address: str, stats: dict) -> list[str]:
    """The stats as a few lines for people; fields the server left out show as '?'."""
    requests, tokens, kv = stats.get("requests", {}), stats.get("tokens", {}), stats.get("kv", {})
    rate = stats.get("tokens_per_s")
    return [
        f"server:   {address} (up {_number(stats.get('uptime_s'))} s)",
        "requests: " + ", ".join(f"{requests.get(name, '?')} {name}"
                                 for name in ("running", "waiting", "queued", "done", "failed")),
        f"tokens:   {tokens.get('prompt', '?')} prompt, {tokens.get('generated', '?')} generated "
        f"({_number(rate)} tokens/s)",
        f"phases:   {_listing(stats.get('phases'))} ({_count(stats.get('transitions'))} transitions)",
        f"kv:       {kv.get('device_blocks_used', '?')}/{kv.get('device_blocks', '?')} device blocks, "
        f"{kv.get('host_blocks_used', '?')}/{kv.get('host_blocks', '?')} host blocks",
        f"jobs:     {stats.get('jobs', {}).get('running', '?')} running",
    ]


def _number(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else "?" if value is None else str(value)


def _listing(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}: {item}" for key, item in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "?" if value is None else str(value)


def _count(value) -> str:
    return str(len(value)) if isinstance(value, (list, dict)) else "?" if value is None else str(value)


def keys(folder: Annotated[Path, typer.Argument(metavar="DIR", help="where the key files go")]) -> None:
    """Write a CURVE key pair, needed to serve on a tcp:// address other hosts can reach."""
    try:
        public_path, secret_path = write_keys(folder)
    except (FileExistsError, OSError) as error:
        _fail(str(error))
    typer.echo(f"wrote {public_path} (public: give it to clients) and {secret_path} (secret: keep it on the server)\n"
               f"server:  seesaw-cli serve --curve-secret-key {secret_path} ...\n"
               f"clients: seesaw-cli submit FILE --server tcp://HOST:PORT --server-key {public_path}")


def _check_files(input_path: Path, output: Path, overwrite: bool) -> None:
    if not input_path.is_file():
        _fail(f"input file {input_path} not found")
    if output.resolve() == input_path.resolve():
        _fail(f"the output {output} is the input file; pick another with -o")
    if output.is_dir():
        _fail(f"the output {output} is a folder; give a file with -o")
    if output.is_file() and output.stat().st_size > 0 and not overwrite:
        _fail(f"{output} already holds results: pass --overwrite to replace them, or -o another file")
    from seesaw.frontend.output import check_folder

    try:
        check_folder("--output", output)
    except ValueError as error:
        _fail(str(error))


def _results(output: Path):
    """The output, emptied and locked for this submit (another one writing it is refused)."""
    from seesaw.frontend.output import OutputError, open_locked

    try:
        return open_locked(output, append=False)
    except OutputError as error:
        _fail(str(error))


@contextmanager
def _terminate_as_interrupt():
    """While inside, SIGTERM acts as Ctrl-C: a terminated submit cancels its job on the daemon."""
    def interrupt(signum, frame) -> NoReturn:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _client(address: str, server_key: str | None, timeout_s: float) -> Client:
    hint = no_socket_hint(address)
    if hint:  # nothing will answer: say so now rather than after the timeout
        _fail(f"no server at {address}{hint}", code=1)
    try:
        return Client(address, server_key=server_key, timeout_s=timeout_s)
    except ValueError as error:
        _fail(str(error))


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
