"""The checkpoint feed: the head serves its checkpoint's tensors to a node that cannot read the
checkpoint folder itself, so that node's keeper fills its weight store once, over the network.

One request names a tensor (by its layout-neutral name) and a row range; the answer is a JSON
header and the rows' raw bytes at the store's dtype. Large tensors are asked for in pieces of at
most `PIECE_BYTES`, so neither side holds more than one piece beyond the store itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import orjson
import torch
import zmq
import zmq.asyncio

from seesaw.layout import Span
from seesaw.transport.host_buffer import torch_dtype

log = logging.getLogger(__name__)

PIECE_BYTES = 64 << 20

Rows = Callable[[str, Span | None], torch.Tensor]


class CheckpointFeed:
    """Serves `rows(name, span)` (a checkpoint read on the head) at `dtype` on a ROUTER socket bound
    to `address` (`tcp://HOST:*`); one request at a time, read off the event loop."""

    def __init__(self, context: zmq.asyncio.Context, address: str, rows: Rows, dtype: str):
        self._rows = rows
        self._dtype = torch_dtype(dtype)
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self.bound_address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="checkpoint-feed")
        return self._task

    async def _serve(self) -> None:
        while True:
            peer, request = await self._socket.recv_multipart()
            try:
                asked = orjson.loads(request)
                span = Span(int(asked["start"]), int(asked["end"]))
                tensor = await asyncio.to_thread(self._read, str(asked["name"]), span)
            except Exception as error:  # noqa: BLE001 - the asking node is told, the head goes on
                log.warning("the checkpoint feed could not answer %r: %s", request[:200], error)
                await self._socket.send_multipart([peer, orjson.dumps({"error": str(error)}), b""])
                continue
            header = orjson.dumps({"shape": list(tensor.shape)})
            await self._socket.send_multipart([peer, header, tensor.view(torch.uint8).numpy()], copy=False)

    def _read(self, name: str, span: Span) -> torch.Tensor:
        return self._rows(name, span).to(self._dtype).contiguous()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close(linger=0)


class FedCheckpoint:
    """A node's side of the feed: `rows(name)` fetches one whole tensor from the head, piece by
    piece, each answer awaited at most `timeout_s` (a thread's blocking reads, not the loop's)."""

    def __init__(self, address: str, shapes: dict[str, tuple[int, ...]], dtype: str, timeout_s: float = 120.0):
        self.address = address
        self.shapes = shapes
        self._dtype = torch_dtype(dtype)
        self._timeout_ms = int(timeout_s * 1000)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self.num_bytes = 0

    def rows(self, name: str, span: Span | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        span = span or Span(0, shape[0])
        row_bytes = math.prod(shape[1:]) * self._dtype.itemsize
        step = max(1, PIECE_BYTES // max(1, row_bytes))
        pieces = [self._piece(name, Span(start, min(span.end, start + step)), shape)
                  for start in range(span.start, span.end, step)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _piece(self, name: str, span: Span, shape: tuple[int, ...]) -> torch.Tensor:
        self._socket.send(orjson.dumps({"name": name, "start": span.start, "end": span.end}))
        if not self._socket.poll(self._timeout_ms):
            raise TimeoutError(f"the head's checkpoint feed at {self.address} did not send {name} rows "
                               f"{span.start}..{span.end} within {self._timeout_ms / 1000:.0f} s")
        header, payload = self._socket.recv_multipart()
        answer = orjson.loads(header)
        if "error" in answer:
            raise ValueError(f"the head's checkpoint feed could not send {name}: {answer['error']}")
        expected = [span.end - span.start, *shape[1:]]
        if answer["shape"] != expected:
            raise ValueError(f"the head's checkpoint feed sent {name} as {answer['shape']}, expected {expected}")
        self.num_bytes += len(payload)
        return torch.frombuffer(bytearray(payload), dtype=self._dtype).view(*expected)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
