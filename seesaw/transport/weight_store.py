"""The host weight store: the whole model's weights in shared memory, once per node, filled once.

Tensors are kept in layout-neutral form (one per name, in the order given), each starting on a
256-byte boundary, so any worker's shard under any layout is a set of contiguous row ranges that
it copies straight into its device buffers at a transition. Nothing is re-read from the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from seesaw.layout import Span
from seesaw.transport.specs import WeightStoreSpec
from seesaw.transport.host_buffer import torch_dtype
from seesaw.transport.shared_memory import Reaper, SharedSegment

_ALIGN_BYTES = 256


def _offsets(shapes: dict[str, tuple[int, ...]], itemsize: int) -> tuple[dict[str, int], int]:
    """Element offset of every tensor and the total bytes, each tensor 256-byte aligned."""
    align = _ALIGN_BYTES // itemsize
    offsets, cursor = {}, 0
    for name, shape in shapes.items():
        cursor = -(-cursor // align) * align
        offsets[name] = cursor
        cursor += math.prod(shape)
    return offsets, cursor * itemsize


def store_bytes(shapes: dict[str, tuple[int, ...]], dtype: str) -> int:
    """The size of a weight store holding `shapes` at `dtype`."""
    return _offsets(shapes, torch_dtype(dtype).itemsize)[1]


class WeightStore:
    """Layout-neutral weights in shared memory; `rows(name, span)` is a view, never a copy."""

    def __init__(self, spec: WeightStoreSpec, shapes: dict[str, tuple[int, ...]], segment: SharedSegment):
        self.spec = spec
        self.shapes = shapes
        self._segment = segment
        dtype = torch_dtype(spec.dtype)
        self._offsets, num_bytes = _offsets(shapes, dtype.itemsize)
        self.flat = segment.tensor(dtype, num_bytes // dtype.itemsize)

    @classmethod
    def create(cls, shapes: dict[str, tuple[int, ...]], dtype: str, reaper: Reaper | None = None) -> WeightStore:
        _, num_bytes = _offsets(shapes, torch_dtype(dtype).itemsize)
        segment = SharedSegment.create("weights", num_bytes, "host weight store",
                                       "re-sharding keeps the whole model in shared memory once per node", reaper)
        return cls(WeightStoreSpec(segment.name, dtype, num_bytes), shapes, segment)

    @classmethod
    def attach(cls, spec: WeightStoreSpec, shapes: dict[str, tuple[int, ...]]) -> WeightStore:
        _, num_bytes = _offsets(shapes, torch_dtype(spec.dtype).itemsize)
        if num_bytes != spec.num_bytes:
            raise ValueError(f"weight store {spec.name} holds {spec.num_bytes} bytes; this model needs {num_bytes}")
        return cls(spec, shapes, SharedSegment(spec.name, num_bytes, is_owner=False))

    def rows(self, name: str, span: Span | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        row_elements = math.prod(shape[1:])
        start, end = (0, shape[0]) if span is None else (span.start, span.end)
        first = self._offsets[name] + start * row_elements
        return self.flat[first : first + (end - start) * row_elements].view(end - start, *shape[1:])

    def fill(self, read: Callable[[str], torch.Tensor], should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Write every tensor once, from `read(name)` (a checkpoint or seeded random values);
        False if `should_stop` said so before the end."""
        with torch.no_grad():
            for name in self.shapes:
                if should_stop():
                    return False
                self.rows(name).copy_(read(name))
        return True

    def close(self) -> None:
        self.flat = None
        self._segment.close()
