"""POSIX shared-memory segments mapped as tensors: the host KV buffer and the host weight store.

The creator reserves the whole segment up front, holds a lock on it for as long as it lives, and
removes it on close; other processes attach by name. Names carry the creator's pid, so a segment
is traceable to its process; the lock, which dies with the process, is what tells a leftover.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from seesaw.kv.host_sizing import NodeMemory

SHM_DIR = Path("/dev/shm")
_OWNED_NAME = re.compile(r"^seesaw-[a-z]+-(\d+)-[0-9a-z_]+$")  # seesaw-KIND-PID-RANDOM


class SharedSegment:
    """One shared-memory segment of `num_bytes`, mapped read-write; the owner unlinks it on close."""

    def __init__(self, name: str, num_bytes: int, is_owner: bool, what: str = "shared memory", flag: str = ""):
        self.name = name
        self.num_bytes = max(1, num_bytes)
        self.is_owner = is_owner
        path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if is_owner else 0)
        fd = os.open(path, flags, 0o600)
        self._lock_fd: int | None = None
        try:
            if is_owner:
                hold_lock(fd)
                _reserve(fd, self.num_bytes, path, what, flag)
            self._map = mmap.mmap(fd, self.num_bytes)
        except BaseException:
            os.close(fd)
            raise
        if is_owner:
            self._lock_fd = fd  # kept open: the lock lasts as long as this process or close()
        else:
            os.close(fd)

    @classmethod
    def create(cls, kind: str, num_bytes: int, what: str, flag: str, reaper: Reaper | None = None) -> SharedSegment:
        """A new segment named `seesaw-KIND-PID-RANDOM`; `what` and `flag` word the error when it does
        not fit; `reaper` removes it should this process die without closing it."""
        name = f"seesaw-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        if reaper is not None:
            reaper.watch(SHM_DIR / name)
        return cls(name, num_bytes, is_owner=True, what=what, flag=flag)

    def tensor(self, dtype: torch.dtype, count: int | None = None) -> torch.Tensor:
        """The segment as a flat tensor of `dtype` (its first `count` elements)."""
        count = self.num_bytes // dtype.itemsize if count is None else count
        return torch.frombuffer(self._map, dtype=dtype, count=count)

    def close(self) -> None:
        """Unmap; the owner also removes the segment so nothing outlives the engine."""
        # If a view is still alive somewhere, the mapping goes with the process instead.
        with contextlib.suppress(BufferError):
            self._map.close()
        if self.is_owner:
            (SHM_DIR / self.name).unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_REAPER_CODE = """
import fcntl, os, shutil, sys, time
paths = [line.rstrip("\\n") for line in sys.stdin]  # until the owner's end of the pipe closes
deadline = time.monotonic() + float(sys.argv[1])
while paths and time.monotonic() < deadline:
    waiting = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed by its owner already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting.append(path)  # its owner is still closing its files
            continue
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    paths = waiting
    if paths:
        time.sleep(0.05)
"""


class Reaper:
    """A small process that removes the segments and folders it is told of once their owner (the
    process that made this) is gone, however it went, SIGKILL included: it reads their paths from a
    pipe, whose end closes with the owner, then removes each one the owner's lock no longer holds
    (an owner that closes them first leaves it nothing to do)."""

    def __init__(self, wait_s: float = 10.0):
        self._process = subprocess.Popen([sys.executable, "-S", "-c", _REAPER_CODE, str(wait_s)],
                                         stdin=subprocess.PIPE, start_new_session=True)

    def watch(self, path: Path) -> None:
        self._process.stdin.write(f"{path}\n".encode())
        self._process.stdin.flush()

    def close(self, timeout_s: float = 5.0) -> None:
        """The owner is done (everything it made is removed): let the reaper go."""
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def read_node_memory() -> NodeMemory:
    """What this node can give shared memory: /dev/shm's free room and the memory available."""
    free = os.statvfs(SHM_DIR)
    available = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    return NodeMemory(free.f_bavail * free.f_frsize, available, str(SHM_DIR))


def hold_lock(fd: int) -> None:
    """Mark a segment or folder as in use for as long as `fd` stays open in this process."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def is_held(path: Path) -> bool:
    """Whether a live process holds the lock of a segment or folder (even one in another PID
    namespace that shares this /dev/shm); unreadable entries count as held."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def reclaim_orphans(folders: list[Path]) -> list[str]:
    """Remove the shared-memory segments and run folders (`seesaw-KIND-PID-RANDOM`) in `folders`
    that no live process holds, as a killed run leaves them; returns what went."""
    removed = []
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if _OWNED_NAME.match(entry.name) is None or is_held(entry):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry))
    return removed


def _reserve(fd: int, num_bytes: int, path: Path, what: str, flag: str) -> None:
    """Back the whole segment now: a sparse one would kill a worker with SIGBUS when it fills up."""
    try:
        os.posix_fallocate(fd, 0, num_bytes)
    except OSError as error:
        path.unlink(missing_ok=True)
        free = os.statvfs(SHM_DIR)
        hint = f": {flag}" if flag else ""
        raise ValueError(
            f"cannot reserve {num_bytes / 2**30:.2f} GiB of shared memory for the {what} "
            f"({SHM_DIR} has {free.f_bavail * free.f_frsize / 2**30:.2f} GiB free){hint}"
        ) from error


def register_with_cuda(tensor: torch.Tensor, what: str) -> int:
    """Pin host memory in place so device copies go straight to and from it (no staging copy);
    returns the pointer to hand to `unregister_with_cuda` before the memory is unmapped."""
    size = tensor.numel() * tensor.element_size()
    status = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), size, 0)
    code = int(getattr(status, "value", status))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of the {what} failed with status {code}")
    return tensor.data_ptr()


def unregister_with_cuda(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


def node_key(hostname: str, shm_dir: Path = SHM_DIR) -> str:
    """Which node a process is on, as shared memory sees it: processes share one host buffer and
    weight store exactly when their keys are equal (same host, same boot, the same /dev/shm: its
    file system and folder; two containers or namespaces on one host with their own /dev/shm,
    a mount of its own or a folder bound there, are two nodes)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "?"
    try:
        found = os.stat(shm_dir)
        device, inode = found.st_dev, found.st_ino
    except OSError:
        device, inode = 0, 0
    return f"{hostname}/{boot}/{device:x}.{inode:x}"
