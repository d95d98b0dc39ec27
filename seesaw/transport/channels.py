"""Typed message channels over ZeroMQ: an actor's inbox (PULL) and the outboxes that reach it (PUSH).

The same code serves one process (`inproc://`), one host (`ipc://`) and several hosts (`tcp://`);
only the address differs.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from seesaw.messages import Decoder, Message, encode

log = logging.getLogger(__name__)


class Inbox:
    """The receiving end of an actor: bound at one or more addresses, decoded messages out (only
    those of the types it `accept`s: by default any message; a frame of another type, or one that
    is not a message, raises ValueError from `recv`)."""

    def __init__(self, context: zmq.asyncio.Context, *addresses: str):
        self.addresses = addresses
        self._decode = Decoder()
        self._socket = context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self.bound_address = ""  # the first address as peers reach it, a wildcard port resolved
        for address in addresses:
            self._socket.bind(address)
            self.bound_address = self.bound_address or self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def accept(self, accepts) -> None:
        """Decode only messages of `accepts` (a union of message types, or one type) from now on."""
        self._decode = Decoder(accepts)

    async def recv(self, timeout_s: float | None = None) -> Message:
        """The next message; TimeoutError after `timeout_s` seconds (None waits for one)."""
        if timeout_s is None:
            return self._decode(await self._socket.recv())
        if not await self._socket.poll(timeout=int(timeout_s * 1000)):
            raise TimeoutError(f"no message on {self.addresses[0]} within {timeout_s:.1f} s")
        return self._decode(await self._socket.recv())

    def recv_nowait(self) -> Message | None:
        """The next message if one is already here, else None (never waits)."""
        received = self._socket.recv(flags=zmq.NOBLOCK)  # an already finished future
        error = received.exception()
        if isinstance(error, zmq.Again):
            return None
        if error is not None:
            raise error
        return self._decode(received.result())

    def close(self) -> None:
        self._socket.close(linger=0)


class Outbox:
    """A sending end connected to one inbox; `send` never blocks: the queue is unbounded, and a
    message to an in-process inbox that has closed (nobody will ever read it) is dropped."""

    def __init__(self, context: zmq.asyncio.Context | zmq.Context, address: str):
        self.address = address
        sync_context = zmq.Context.shadow(context.underlying)
        self._socket = sync_context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 2000)
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.connect(address)

    def send(self, message: Message) -> bool:
        """Queue `message`; False when it was dropped because its inbox is gone."""
        try:
            self._socket.send(encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:  # with no high-water mark, only a PUSH without any peer left refuses
            log.debug("dropped %s to %s: its inbox is closed", type(message).__name__, self.address)
            return False
        return True

    def close(self, linger_s: float = 2.0) -> None:
        self._socket.close(linger=int(linger_s * 1000))

