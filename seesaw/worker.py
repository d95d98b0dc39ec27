"""The worker process: one ShardWorker actor, its sockets, heartbeats, and a watch on the head.

The head starts local workers as `python -m seesaw.worker OPTIONS`, its `WorkerOptions` as one
JSON argument; workers on other hosts join with `seesaw-cli worker --head tcp://HOST:PORT` and get
a rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields

import orjson
import zmq.asyncio

from seesaw.actors.shard_worker import ShardWorker
from seesaw.messages import Heartbeat, WorkerFailed, WorkerHello
from seesaw.transport.addresses import advertise_ip, host_of, pin_interfaces, reachable
from seesaw.transport.channels import Inbox, Outbox
from seesaw.transport.shared_memory import node_key

log = logging.getLogger("seesaw.worker")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker process is told at start: by `seesaw-cli worker`, or by the head as one JSON
    argument of `python -m seesaw.worker`."""

    head: str  # the head's supervisor address
    rank: int | None = None  # None: the head assigns one
    inbox: str | None = None  # address to bind for commands; None: a free TCP port
    local_rank: int | None = None  # which of this host's GPUs; None: LOCAL_RANK or SLURM_LOCALID, else the first free
    heartbeat_s: float = 1.0
    head_timeout_s: float = 60.0  # exit after this long without the head
    join_timeout_s: float = 60.0  # give up joining when the head has not answered within this long
    advertise_address: str | None = None  # this host's address as the head and the other workers reach it
    parent_pid: int | None = None  # the head that spawned this worker, which it dies with
    log_level: str = "WARNING"

    def encode(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def decode(cls, text: str) -> WorkerOptions:
        """The options `encode` wrote; a ValueError naming what is wrong otherwise."""
        try:
            values = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"worker options are not JSON: {error}") from None
        names = {field.name for field in fields(cls)}
        if not isinstance(values, dict) or "head" not in values or not values.keys() <= names:
            raise ValueError(f"worker options must be a JSON object with 'head' and no keys but {sorted(names)}, "
                             f"got {text!r}")
        return cls(**values)


def main(options: WorkerOptions) -> int:
    logging.basicConfig(level=options.log_level, format="%(asctime)s worker %(levelname)s %(message)s")
    if options.parent_pid is not None:
        # A signal to the whole process group (Ctrl-C, a cluster scheduler's SIGTERM) is the head's
        # to handle: it finishes what is in flight, then shuts its workers down.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        _die_with_parent()
    with contextlib.suppress(ImportError):  # uvloop is optional; asyncio's own loop works too
        import uvloop

        uvloop.install()
    code = asyncio.run(serve(options))
    logging.shutdown()
    # A step stuck in a collective whose peer died must not keep the process alive.
    os._exit(code)


async def serve(options: WorkerOptions) -> int:
    context = zmq.asyncio.Context()
    supervisor = Outbox(context, options.head)
    ip = _local_ip(options.head, options.advertise_address)
    pin_interfaces(ip, os.environ)  # before torch.distributed starts: gloo and NCCL use this interface too
    # An address given by hand may belong to a NAT or a container's host: listen everywhere, announce it.
    inbox = Inbox(context, options.inbox or f"tcp://{'0.0.0.0' if options.advertise_address else ip}:*")
    announced = reachable(inbox.bound_address, ip)
    worker = ShardWorker(inbox, options.rank, supervisor, context, local_rank(options.local_rank, os.environ), ip)
    loop = asyncio.get_running_loop()
    if options.parent_pid is None:  # a worker started by hand stops on a signal
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopped.set)
    supervisor.send(WorkerHello(options.rank, os.getpid(), socket.gethostname(), announced, node_key(socket.gethostname())))
    task = worker.start()
    heartbeat = loop.create_task(_heartbeat(worker, supervisor, options, announced))
    stopped = loop.create_task(worker.stopped.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 1 if worker.has_failed else 0
    if task.done() and task.exception() is not None:
        supervisor.send(WorkerFailed(worker.rank, repr(task.exception()), "handling a message", os.getpid()))
        exit_code = 1
    heartbeat.cancel()
    stopped.cancel()
    await worker.stop()
    supervisor.close()
    context.term()
    return exit_code


def local_rank(given: int | None, environ) -> int:
    """Which of this host's GPUs the worker takes: as given, or as a launcher says (LOCAL_RANK,
    SLURM_LOCALID); else the first one no other worker on this host has claimed (CPU: 0)."""
    if given is not None:
        return given
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return _claim_free_gpu()


def _claim_free_gpu() -> int:
    """Hold a lock on the first unclaimed GPU index of this host for as long as this process lives."""
    import fcntl
    import tempfile

    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(count):
        fd = os.open(f"{tempfile.gettempdir()}/seesaw-gpu-{os.getuid()}-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return index  # the descriptor stays open: the claim lasts as long as the process
        except BlockingIOError:
            os.close(fd)
    if count:
        raise RuntimeError(f"all {count} GPUs of this host are held by other Seesaw workers; give --local-rank")
    return 0


def _local_ip(head: str, override: str | None) -> str:
    """The address other hosts reach this one at: as given, else the interface toward the head."""
    if not head.startswith("tcp://"):
        return override or "127.0.0.1"
    return advertise_ip(host_of(head), override, os.environ)


async def _heartbeat(worker: ShardWorker, supervisor: Outbox, options: WorkerOptions, inbox: str) -> None:
    started = time.monotonic()
    while True:
        if options.parent_pid is not None and os.getppid() != options.parent_pid:
            log.error("the head process is gone; exiting")
            worker.stopped.set()
            return
        if worker.heard_head is None and time.monotonic() - started > options.join_timeout_s:
            reason = _no_answer(options, inbox)
            log.error("%s", reason)
            supervisor.send(WorkerFailed(worker.rank, reason, "joining", os.getpid()))
            worker.has_failed = True
            worker.stopped.set()
            return
        if worker.heard_head is not None and time.monotonic() - worker.heard_head > options.head_timeout_s:
            log.error("nothing from the head for %.0f s; exiting", options.head_timeout_s)
            worker.has_failed = True
            worker.stopped.set()
            return
        if worker.rank is not None:  # a worker that joined without a rank waits for the head's answer
            supervisor.send(Heartbeat(worker.rank))
        await asyncio.sleep(options.heartbeat_s)


def _no_answer(options: WorkerOptions, inbox: str) -> str:
    """Why a worker that never heard its head gives up, and what to try."""
    return (f"the worker on {socket.gethostname()} heard nothing from the head within {options.join_timeout_s:.0f} s. "
            f"Either it cannot reach the head at {options.head} (check --head or SEESAW_HEAD, and that the head runs "
            f"with that --head-address), or the head cannot reach this worker at {inbox} (give this worker "
            f"--advertise-address with an address of this host the head's host can reach)")


def _die_with_parent() -> None:
    """Ask Linux to end this process when its parent dies, so no worker outlives the head."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # it ignores SIGTERM, which is the head's to handle


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m seesaw.worker OPTIONS (WorkerOptions as JSON, as the head writes them)")
    try:
        options = WorkerOptions.decode(sys.argv[1])
    except ValueError as error:
        sys.exit(f"seesaw.worker: {error}")
    sys.exit(main(options))
