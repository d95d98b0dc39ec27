"""A recording stand-in for torch's CUDA devices, streams, events and allocations, under which the
worker's CUDA code paths run on CPU tensors and every device and stream use is noted with its thread.

It models what matters for ordering: each thread has its own current device, 0 until it sets one
(as CUDA's runtime has); a stream context switches to the stream's device and back on exit; a
`Tensor.copy_` is noted with the stream current on its thread and the address it writes; an
allocation on a CUDA device (or in pinned memory) is made on the CPU and noted with the device it
names (a bare "cuda" names the thread's current one); events are noted by name when recorded and
waited for. `install(monkeypatch)` puts it in place of the torch functions the runtime calls;
`uses` is the record.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Use:
    """One noted call: what, on which device, from which thread, and the stream it names or runs on."""

    what: str
    device: int
    thread: str
    stream: str | None = None
    waited_for: str | None = None  # wait_stream: the stream waited for
    event: str | None = None  # event record / event synchronize: which event
    target: int | None = None  # copy: the address written


class RecordingCuda:
    def __init__(self):
        self.uses: list[Use] = []
        self._threads = threading.local()
        self._lock = threading.Lock()
        self._count = 0

    # ------------------------------------------------------------ the record

    def note(self, what: str, device: int, stream: str | None = None, waited_for: str | None = None,
             event: str | None = None, target: int | None = None) -> None:
        with self._lock:
            self.uses.append(Use(what, device, threading.current_thread().name, stream, waited_for, event, target))

    def _name(self, kind: str) -> str:
        with self._lock:
            self._count += 1
            return f"{kind}-{self._count}"

    @property
    def current_device(self) -> int:
        return getattr(self._threads, "device", 0)

    @property
    def current_stream_name(self) -> str:
        return getattr(self._threads, "stream", None) or f"default-{self.current_device}"

    def threads_that_used_a_device_before_setting_it(self) -> set[str]:
        bound, unbound = set(), set()
        for use in self.uses:
            if use.what == "set_device":
                bound.add(use.thread)
            elif use.thread not in bound:
                unbound.add(use.thread)
        return unbound

    # ------------------------------------------------------------ torch.cuda's surface

    def set_device(self, device) -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        self._threads.device = index
        self.note("set_device", index)

    @contextlib.contextmanager
    def device(self, device):
        index = torch.device(device).index
        previous = self.current_device
        self._threads.device = index
        self.note("device", index)
        try:
            yield
        finally:
            self._threads.device = previous
            self.note("device restored", previous)

    @contextlib.contextmanager
    def stream(self, stream: StandinStream):
        previous_device, previous_stream = self.current_device, getattr(self._threads, "stream", None)
        self._threads.device = stream.index
        self._threads.stream = stream.name
        self.note("stream entered", stream.index, stream.name)
        try:
            yield
        finally:
            self._threads.device, self._threads.stream = previous_device, previous_stream
            self.note("stream left", previous_device, previous_stream)  # restores the device it found

    def make_stream(self, device=None) -> StandinStream:
        index = self.current_device if device is None else torch.device(device).index
        self.note("new stream", index)
        return StandinStream(self, index, self._name("stream"))

    def default_stream(self, device=None) -> StandinStream:
        index = self.current_device if device is None else torch.device(device).index
        return StandinStream(self, index, f"default-{index}")

    def current_stream(self, device=None) -> StandinStream:
        index = self.current_device if device is None else torch.device(device).index
        return StandinStream(self, index, self.current_stream_name)

    def make_event(self, *args, **kwargs) -> StandinEvent:
        return StandinEvent(self, self._name("event"))

    def device_index(self, device) -> int | None:
        """The CUDA device an allocation names (a bare "cuda": this thread's), None for the CPU."""
        if device is None:
            return None
        device = torch.device(device)
        if device.type != "cuda":
            return None
        return self.current_device if device.index is None else device.index

    def synchronize(self, device=None) -> None:
        self.note("synchronize", self.current_device if device is None else torch.device(device).index)


class StandinStream:
    def __init__(self, cuda: RecordingCuda, index: int, name: str):
        self.cuda, self.index, self.name = cuda, index, name
        self.cuda_stream = 0

    def wait_stream(self, other: StandinStream) -> None:
        self.cuda.note("wait_stream", self.index, self.name, other.name)

    def synchronize(self) -> None:
        self.cuda.note("stream synchronize", self.index, self.name)


class StandinEvent:
    def __init__(self, cuda: RecordingCuda, name: str):
        self.cuda, self.name = cuda, name

    def record(self, stream=None) -> None:
        name = self.cuda.current_stream_name if stream is None else stream.name
        self.cuda.note("event record", self.cuda.current_device, name, event=self.name)

    def synchronize(self) -> None:
        self.cuda.note("event synchronize", self.cuda.current_device, event=self.name)


def install(monkeypatch) -> RecordingCuda:
    cuda = RecordingCuda()
    monkeypatch.setattr(torch.cuda, "set_device", cuda.set_device)
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream)
    monkeypatch.setattr(torch.cuda, "Stream", cuda.make_stream)
    monkeypatch.setattr(torch.cuda, "Event", cuda.make_event)
    monkeypatch.setattr(torch.cuda, "default_stream", cuda.default_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", cuda.synchronize)
    copy = torch.Tensor.copy_

    def noted_copy(tensor, source, non_blocking=False):
        cuda.note("copy", cuda.current_device, cuda.current_stream_name, target=tensor.data_ptr())
        return copy(tensor, source, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", noted_copy)
    for name in ("empty", "zeros"):
        monkeypatch.setattr(torch, name, _on_the_cpu(cuda, getattr(torch, name)))
    return cuda


def _on_the_cpu(cuda: RecordingCuda, make):
    """`make` (torch.empty, torch.zeros) with CUDA and pinned allocations made on the CPU, noted."""

    def made(*args, device=None, pin_memory=False, **kwargs):
        index = cuda.device_index(device)
        if index is not None:
            cuda.note("allocate", index)
            device = "cpu"
        if pin_memory:
            cuda.note("allocate pinned", cuda.current_device)  # pinning makes a context on the current device
        return make(*args, device=device, **kwargs)

    return made
