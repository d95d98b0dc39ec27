"""How large the node's host KV buffer is when the user leaves it to the engine (`--host-buffer-gb
auto`), and whether a size the user asked for fits (pure: the caller reads the node's memory).

Seesaw mode keeps every request's KV in the host buffer between its phases, so a larger buffer
means longer phases and fewer re-shards: auto takes what the node can give, which is the smaller
of what /dev/shm can still take and what memory has available, less the weight store (it lives in
/dev/shm too), the engine's own processes and a reserve. A buffer larger than the job's whole KV
buys nothing, so when the job is known (a batch file) it is the cap. Static mode only parks
requests evicted from the device there (never more than a device pool's worth at once), so it
takes a worker's KV pool where that is known (at most 4 GiB), as other engines' swap space does.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
STATIC_BYTES_PER_WORKER = 4 * GIB  # static mode: room for requests evicted from the device (at most)
MIN_RESERVE_BYTES = 2 * GIB  # memory never given to the buffer, whatever the node has
RESERVE_SHARE = 0.1  # and a tenth of what is available, for everything else on the node
FEW_POOLS = 4  # a seesaw buffer holding fewer device pools' worth of KV than this re-shards often


@dataclass(frozen=True)
class NodeMemory:
    """What the node can give: free room in /dev/shm, and memory available without swapping."""

    shm_free_bytes: int
    available_bytes: int
    shm_path: str = "/dev/shm"

    @property
    def reserve_bytes(self) -> int:
        return max(MIN_RESERVE_BYTES, int(RESERVE_SHARE * self.available_bytes))


@dataclass(frozen=True)
class HostBufferPlan:
    """The buffer's size and, in one line, why that size."""

    num_bytes: int
    reason: str
    holds_whole_job: bool = False  # every request of the job fits at once: transitions cannot be frequent

    @property
    def gib(self) -> float:
        return self.num_bytes / GIB


def size_text(num_bytes: int) -> str:
    """A size for people: GiB with one decimal, MiB below one GiB."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"


def room_for_buffer(memory: NodeMemory, store_bytes: int, process_bytes: int) -> int:
    """Bytes the host buffer may take: /dev/shm's free room and the available memory, each less
    the weight store (both hold it), the memory also less the processes and the reserve."""
    shm_room = memory.shm_free_bytes - store_bytes
    memory_room = memory.available_bytes - store_bytes - process_bytes - memory.reserve_bytes
    return max(0, min(shm_room, memory_room))


def auto_host_buffer(memory: NodeMemory, *, store_bytes: int, process_bytes: int, min_bytes: int,
                     job_bytes: int | None, is_seesaw: bool, num_workers: int,
                     pool_bytes: int | None = None) -> HostBufferPlan:
    """The auto-sized buffer. `store_bytes` is the weight store's size (0 when phases keep one
    layout), `process_bytes` what the engine's processes hold in host memory, `min_bytes` the
    least a seesaw run needs (one request of the model's full length per replica), `job_bytes`
    the KV of the whole job when it is known, `pool_bytes` a worker's device KV pool when it is
    known before the workers start. Raises ValueError, saying how to make room, when a seesaw run
    cannot have `min_bytes`."""
    per_worker = min(STATIC_BYTES_PER_WORKER, pool_bytes or STATIC_BYTES_PER_WORKER)
    room = room_for_buffer(memory, store_bytes, process_bytes)
    if is_seesaw and room < min_bytes:
        raise ValueError(_too_little_room(memory, store_bytes, process_bytes, min_bytes))
    where = (f"/dev/shm has {memory.shm_free_bytes / GIB:.1f} GiB free and memory "
             f"{memory.available_bytes / GIB:.1f} GiB available")
    if store_bytes:
        where += f", {store_bytes / GIB:.1f} GiB of it for the weight store"
    if job_bytes is not None and job_bytes <= room and (is_seesaw or job_bytes <= num_workers * per_worker):
        size = max(job_bytes, min_bytes if is_seesaw else 0)
        return HostBufferPlan(size, f"host KV buffer {size_text(size)} (auto): the whole job's KV ({where})",
                              holds_whole_job=True)
    if not is_seesaw:
        size = min(room, num_workers * per_worker)
        return HostBufferPlan(size, f"host KV buffer {size_text(size)} (auto): room for requests evicted from "
                                    f"the device, {size_text(per_worker)} per worker ({where})")
    return HostBufferPlan(room, f"host KV buffer {size_text(room)} (auto): what the node leaves ({where}; "
                                f"{memory.reserve_bytes / GIB:.1f} GiB kept back for the rest)")


def _too_little_room(memory: NodeMemory, store_bytes: int, process_bytes: int, min_bytes: int) -> str:
    shm_room = memory.shm_free_bytes - store_bytes
    if shm_room < min_bytes:
        return (f"{memory.shm_path} has {memory.shm_free_bytes / GIB:.2f} GiB free; seesaw mode keeps the weight "
                f"store ({store_bytes / GIB:.2f} GiB) and a host KV buffer of at least {min_bytes / GIB:.2f} GiB (one "
                f"request of the model's full length per replica) there. Enlarge it (mount -o remount,size=64G "
                f"{memory.shm_path}, or docker run --shm-size 64g), or run one layout with --layout")
    return (f"this host has {memory.available_bytes / GIB:.2f} GiB of memory available; seesaw mode needs the weight "
            f"store ({store_bytes / GIB:.2f} GiB), the engine's processes (about {process_bytes / GIB:.2f} GiB), "
            f"{memory.reserve_bytes / GIB:.1f} GiB kept back and a host KV buffer of at least {min_bytes / GIB:.2f} GiB; "
            f"free some memory, or run one layout with --layout")


def check_host_buffer(asked_bytes: int, memory: NodeMemory, store_bytes: int) -> None:
    """Raise ValueError, naming both sizes, when an asked-for buffer cannot fit /dev/shm beside the
    weight store."""
    if asked_bytes + store_bytes <= memory.shm_free_bytes:
        return
    beside = f" beside the {store_bytes / GIB:.2f} GiB weight store" if store_bytes else ""
    raise ValueError(f"--host-buffer-gb {asked_bytes / GIB:g} does not fit {memory.shm_path}, which has "
                     f"{memory.shm_free_bytes / GIB:.2f} GiB free{beside}; lower --host-buffer-gb (or leave it "
                     f"auto), or enlarge {memory.shm_path}")


def few_pools_warning(plan: HostBufferPlan, host_blocks: int, device_blocks: int) -> str | None:
    """A one-line warning when a seesaw run's buffer holds only a few device pools' worth of KV
    (its phases will be short and its re-shards many), or None."""
    if plan.holds_whole_job or not device_blocks or host_blocks >= FEW_POOLS * device_blocks:
        return None
    return (f"the host KV buffer holds {host_blocks / device_blocks:.1f} device KV pools' worth per replica: "
            f"phases will be short and re-shards frequent; raise --host-buffer-gb (or make room in /dev/shm)")
