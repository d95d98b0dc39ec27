"""The worker process: one ShardWorker actor, its sockets, heartbeats, and a watch on the head.

Started by the head as `python -m seesaw.worker --rank R --inbox ADDR --head-dir ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys

import zmq.asyncio

from seesaw.actors.shard_worker import ShardWorker
from seesaw.messages import Heartbeat, WorkerFailed, WorkerHello
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger("seesaw.worker")
_PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="seesaw.worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--inbox", required=True, help="address this worker binds for commands")
    parser.add_argument("--supervisor", required=True)
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--kv-tier", required=True)
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s worker {args.rank} %(levelname)s %(message)s")
    _die_with_parent()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    context = zmq.asyncio.Context()
    supervisor = Outbox(context, args.supervisor)
    outboxes = [supervisor, Outbox(context, args.scheduler), Outbox(context, args.kv_tier)]
    worker = ShardWorker(Inbox(context, args.inbox), args.rank, *outboxes)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stopped.set)
    supervisor.send(WorkerHello(args.rank, os.getpid(), socket.gethostname()))
    task = worker.start()
    heartbeat = loop.create_task(_heartbeat(worker, supervisor, args))
    stopped = loop.create_task(worker.stopped.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if task.done() and task.exception() is not None:
        supervisor.send(WorkerFailed(args.rank, repr(task.exception()), "handling a message"))
        exit_code = 1
    heartbeat.cancel()
    stopped.cancel()
    await worker.stop()
    for outbox in outboxes:
        outbox.close()
    context.term()
    return exit_code


async def _heartbeat(worker: ShardWorker, supervisor: Outbox, args: argparse.Namespace) -> None:
    while True:
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            log.error("the head process is gone; exiting")
            worker.stopped.set()
            return
        supervisor.send(Heartbeat(args.rank))
        await asyncio.sleep(args.heartbeat_s)


def _die_with_parent() -> None:
    """Ask Linux to end this process when its parent dies, so no worker outlives the head."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
