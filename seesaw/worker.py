"""The worker process: one ShardWorker actor, its sockets, heartbeats, and a watch on the head.

The head starts local workers as `python -m seesaw.worker --head ADDR --rank R --inbox ADDR`;
workers on other hosts join with `seesaw-cli worker --head tcp://HOST:PORT` and get a rank.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time

import zmq.asyncio

from seesaw.actors.shard_worker import ShardWorker
from seesaw.messages import Heartbeat, WorkerFailed, WorkerHello
from seesaw.transport.addresses import advertise_ip, host_of, pin_interfaces, reachable
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger("seesaw.worker")
_PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="seesaw.worker")
    parser.add_argument("--head", required=True, help="the head's supervisor address")
    parser.add_argument("--rank", type=int, default=None, help="the rank to take (default: the head assigns one)")
    parser.add_argument("--inbox", default=None, help="address to bind for commands (default: a free TCP port)")
    parser.add_argument("--local-rank", type=int, default=None,
                        help="which of this host's GPUs to use (default: LOCAL_RANK or SLURM_LOCALID, else the "
                             "first GPU no other Seesaw worker on this host holds)")
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--head-timeout-s", type=float, default=60.0, help="exit after this long without the head")
    parser.add_argument("--join-timeout-s", type=float, default=60.0,
                        help="give up joining when the head has not answered within this long")
    parser.add_argument("--advertise-address", default=None,
                        help="this host's address as the head and the other workers reach it (default: the "
                             "interface toward the head, or GLOO_SOCKET_IFNAME's)")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(levelname)s %(message)s")
    if args.parent_pid is not None:
        # A signal to the whole process group (Ctrl-C, a cluster scheduler's SIGTERM) is the head's
        # to handle: it finishes what is in flight, then shuts its workers down.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        _die_with_parent()
    with contextlib.suppress(ImportError):  # uvloop is optional; asyncio's own loop works too
        import uvloop

        uvloop.install()
    code = asyncio.run(serve(args))
    logging.shutdown()
    # A step stuck in a collective whose peer died must not keep the process alive.
    os._exit(code)


async def serve(args: argparse.Namespace) -> int:
    context = zmq.asyncio.Context()
    supervisor = Outbox(context, args.head)
    ip = _local_ip(args.head, args.advertise_address)
    pin_interfaces(ip, os.environ)  # before torch.distributed starts: gloo and NCCL use this interface too
    # An address given by hand may belong to a NAT or a container's host: listen everywhere, announce it.
    inbox = Inbox(context, args.inbox or f"tcp://{'0.0.0.0' if args.advertise_address else ip}:*")
    announced = reachable(inbox.bound_address, ip)
    worker = ShardWorker(inbox, args.rank, supervisor, context, local_rank(args.local_rank, os.environ), ip)
    loop = asyncio.get_running_loop()
    if args.parent_pid is None:  # a worker started by hand stops on a signal
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopped.set)
    supervisor.send(WorkerHello(args.rank, os.getpid(), socket.gethostname(), announced))
    task = worker.start()
    heartbeat = loop.create_task(_heartbeat(worker, supervisor, args, announced))
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


async def _heartbeat(worker: ShardWorker, supervisor: Outbox, args: argparse.Namespace, inbox: str) -> None:
    started = time.monotonic()
    while True:
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            log.error("the head process is gone; exiting")
            worker.stopped.set()
            return
        if worker.heard_head is None and time.monotonic() - started > args.join_timeout_s:
            reason = _no_answer(args, inbox)
            log.error("%s", reason)
            supervisor.send(WorkerFailed(worker.rank, reason, "joining", os.getpid()))
            worker.has_failed = True
            worker.stopped.set()
            return
        if worker.heard_head is not None and time.monotonic() - worker.heard_head > args.head_timeout_s:
            log.error("nothing from the head for %.0f s; exiting", args.head_timeout_s)
            worker.has_failed = True
            worker.stopped.set()
            return
        if worker.rank is not None:  # a worker that joined without a rank waits for the head's answer
            supervisor.send(Heartbeat(worker.rank))
        await asyncio.sleep(args.heartbeat_s)


def _no_answer(args: argparse.Namespace, inbox: str) -> str:
    """Why a worker that never heard its head gives up, and what to try."""
    return (f"the worker on {socket.gethostname()} heard nothing from the head within {args.join_timeout_s:.0f} s. "
            f"Either it cannot reach the head at {args.head} (check --head or SEESAW_HEAD, and that the head runs "
            f"with that --head-address), or the head cannot reach this worker at {inbox} (give this worker "
            f"--advertise-address with an address of this host the head's host can reach)")


def _die_with_parent() -> None:
    """Ask Linux to end this process when its parent dies, so no worker outlives the head."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # it ignores SIGTERM, which is the head's to handle


if __name__ == "__main__":
    sys.exit(main())
