"""`seesaw-cli serve` from start to exit: load the engine once, serve until a signal, drain, and
leave no process, socket file or shared memory behind. The first SIGTERM or SIGINT drains (the
requests in flight finish within --drain-timeout); a second one stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import zmq

from seesaw.config import ServeConfig
from seesaw.engine import Engine, EngineError
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.front_door import FrontDoor
from seesaw.frontend.server import Server
from seesaw.messages import ErrorCode
from seesaw.transport.curve import ensure_socket_folder

EXIT_OK, EXIT_FAILED = 0, 1  # interrupted by a signal: 128 + its number, as shells report it


class AddressInUse(RuntimeError):
    """Another server listens at the address."""


async def run_server(engine: Engine, config: ServeConfig, defaults: SamplingDefaults, started: float,
                     stream: TextIO = sys.stderr) -> int:
    """Serve until stopped; the exit code: 0 after a drain, 1 if the engine failed, 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM, as shells report them) when a second signal
    cut the drain short or a signal stopped the start."""
    loop = asyncio.get_running_loop()
    received: list[int] = []
    stopping, now = asyncio.Event(), asyncio.Event()
    main = asyncio.current_task()
    code, closing = EXIT_FAILED, False

    def on_signal(signum: int) -> None:
        received.append(signum)
        if closing:
            return  # already on the way out; what follows takes seconds at most
        if not engine.is_ready:
            if len(received) == 1:
                main.cancel()  # still starting: nothing to drain
        elif len(received) == 1:
            _echo(stream, f"{signal.Signals(signum).name}: taking nothing new; the requests in flight get up to "
                          f"{config.drain_timeout_s:.0f} s (another signal stops at once)")
            stopping.set()
        else:
            now.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    doors: list[FrontDoor] = []
    stop_metrics, lock = None, None
    try:
        lock = _claim(config.address)
        await engine.start()
        gc.freeze()  # what start-up made (torch, the tokenizer, the actors) lives on: no collection need walk it
        name = engine.model.name
        if config.address is not None:
            doors.append(Server(engine, config, defaults, name))
            await doors[-1].start()
            _echo(stream, f"serving {name} on {config.address} (ready in {time.perf_counter() - started:.1f} s)")
        if config.http is not None:
            from seesaw.frontend.http_server import HttpServer

            doors.append(HttpServer(engine, config, defaults, name))
            await doors[-1].start()
            _echo(stream, f"serving {name} at http://{_url_host(config.http.host)}:{doors[-1].port} "
                          f"(the OpenAI API; the page at /; ready in {time.perf_counter() - started:.1f} s)")
        if config.metrics_port is not None:
            stop_metrics = _start_metrics(doors[0], config.metrics_port, loop)
        if engine.pin_s:
            _echo(stream, f"pinned the host buffer and weight store for the GPUs in {engine.pin_s:.1f} s")
        code = await _serve(engine, doors, config, stopping, now, received, stream)
    except asyncio.CancelledError:
        if not received:
            raise
        code = 128 + received[-1]
    except (EngineError, AddressInUse, OSError, ValueError, zmq.ZMQError) as error:
        _echo(stream, f"error: {error}")
    finally:
        closing = True
        try:
            if stop_metrics is not None:
                stop_metrics()
            for door in doors:
                await door.close()
            await engine.close()
        finally:
            _release(config.address, lock)
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
    _echo(stream, "stopped")
    return code


async def _serve(engine: Engine, doors: list[FrontDoor], config: ServeConfig, stopping: asyncio.Event,
                 now: asyncio.Event, received: list[int], stream: TextIO) -> int:
    waiters = [asyncio.ensure_future(event.wait())
               for event in (stopping, engine.failed, *(door.failed for door in doors))]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    failure = next((door.failure for door in doors if door.failure is not None), None)
    if failure is not None:
        _echo(stream, f"error: {failure}")
        await asyncio.gather(*(door.abandon(f"the server failed: {failure}") for door in doors))
        return EXIT_FAILED
    if engine.failure is not None:
        # The RequestQueue answers every request with the failure; let those replies go out
        # (and answer any it could not, if the failure was its own).
        _echo(stream, f"error: {engine.failure}")
        await asyncio.gather(*(door.drain(2.0, engine.failure, ErrorCode.ENGINE_FAILED) for door in doors))
        return EXIT_FAILED
    drain = asyncio.ensure_future(asyncio.gather(*(door.drain(config.drain_timeout_s) for door in doors)))
    cut = asyncio.ensure_future(now.wait())
    await asyncio.wait([drain, cut], return_when=asyncio.FIRST_COMPLETED)
    cut.cancel()
    if drain.done():
        failed = sum(drain.result())
        if failed:
            _echo(stream, f"{failed} requests or jobs did not finish within --drain-timeout and were failed")
        return EXIT_OK
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    await asyncio.gather(*(door.abandon("the server was stopped at once (a second signal)") for door in doors))
    return 128 + received[-1]  # the signal that cut the drain short


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _start_metrics(server: FrontDoor, port: int, loop: asyncio.AbstractEventLoop):
    """Serve `server`'s stats on the metrics port (the HTTP front door keeps them fresh itself)."""
    from seesaw.frontend.prometheus import serve_metrics

    stop_http = serve_metrics(port, lambda: server.latest_stats)
    refresh = loop.create_task(server.refresh_stats(interval_s=1.0) if isinstance(server, Server)
                               else asyncio.sleep(0))

    def stop() -> None:
        refresh.cancel()
        stop_http()

    return stop


def _claim(address: str | None) -> int | None:
    """For an ipc address: make its folder, take its lock (refusing if a live server holds it) and
    remove a socket file a dead server left. The lock's descriptor, or None for tcp (or no address)."""
    if address is None or not address.startswith("ipc://"):
        return None
    ensure_socket_folder(address)
    path = Path(address.removeprefix("ipc://"))
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AddressInUse(f"another seesaw server is serving on {address}") from None
    path.unlink(missing_ok=True)
    return fd


def _release(address: str | None, lock: int | None) -> None:
    if lock is None:
        return
    path = Path(address.removeprefix("ipc://"))
    path.unlink(missing_ok=True)
    Path(f"{path}.lock").unlink(missing_ok=True)
    os.close(lock)


def _echo(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)
