"""A worker's compute for its whole life: the device, communicators, host buffer and weight
store, the sampler, one weight arena and one KV arena, and a LayoutState per layout of the run.

A transition (`reshard`) lays the next layout's shard over the weight arena and fills it from the
host weight store; the KV arena is never reallocated, only viewed differently. Every method runs
on one of the worker's executor threads, never on its event loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from seesaw.layout import Layout, shard_for
from seesaw.model.cpu_kernels import load_paged_decode
from seesaw.model.llama import LayerKernels, ShardModel
from seesaw.model.logits import adjusted_logits, as_entries, token_logprobs
from seesaw.model.rope import inverse_frequencies
from seesaw.model.sampler import Sampler
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import WeightSource
from seesaw.runtime.arena import Arena, KVArena, block_elements, measure
from seesaw.runtime.layout_state import LayoutState, StageContext, group_uses, pass_along
from seesaw.runtime.memory_plan import DeviceMemory, kv_pool_bytes
from seesaw.runtime.step_bounds import StepBounds, decode_buckets, step_bytes_per_block
from seesaw.runtime.step_inputs import (
    AttentionKernels,
    BlockTables,
    SampledTokens,
    StepInputs,
    Uploader,
    build_step_inputs,
)
from seesaw.runtime.token_counts import TokenCounts
from seesaw.runtime.transfers import DeviceCopies
from seesaw.step import PromptLogprobs, RowSampling, StepRow, TokenLogprobs
from seesaw.transport.collective import Communicator, leave_groups
from seesaw.transport.host_buffer import HostBuffer, torch_dtype
from seesaw.transport.weight_store import WeightStore

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class RuntimeConfig:
    """What a worker builds its runtime from (the worker derives it from its load command)."""

    spec: ModelSpec
    rank: int
    layouts: tuple[Layout, ...]  # the run's layouts; the worker starts in the first
    dtype: str
    device: str  # "cpu" or "cuda"
    block_size: int
    kv_cache_bytes: int | None  # None: what the card has left after the weights
    memory_fraction: float
    num_threads: int
    seed: int
    device_index: int = 0  # which of this host's GPUs (the worker's local rank); unused on CPU
    max_step_tokens: int = 2048  # the largest step the scheduler may plan, profiled to size the KV pool
    max_step_rows: int = 256
    max_model_len: int | None = None  # the longest request; None: the model's own length


class WorkerRuntime:
    """Runs steps, transitions and KV copies for one worker across the run's layouts."""

    def __init__(self, config: RuntimeConfig, communicators: dict[str, Communicator], weights: WeightSource,
                 host_buffer: HostBuffer | None = None):
        started = time.perf_counter()
        spec = config.spec
        self.spec = spec
        self.device = device_for(config.device, config.device_index)
        self.dtype = torch_dtype(config.dtype)
        self.block_size = config.block_size
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        else:
            torch.cuda.set_device(self.device)
        self.weights = weights
        self.communicators = communicators
        self.host_buffer = host_buffer
        self.copies = DeviceCopies(self.device)
        pinning = time.perf_counter()
        if host_buffer is not None:
            self.copies.register(host_buffer.blocks, "host KV buffer")
        if isinstance(weights, WeightStore):
            self.copies.register(weights.flat, "host weight store")
        self.pin_s = time.perf_counter() - pinning if self.copies.is_cuda else 0.0  # pinning the shared memory
        shards = [shard_for(layout, spec.shape, config.rank) for layout in dict.fromkeys(config.layouts)]
        weight_bytes = max(measure(lambda a, s=s: ShardModel(spec, s, a), self.dtype) for s in shards)
        self.weight_arena = Arena(weight_bytes, self.device)
        page_elements = max(block_elements(s, self.block_size, spec.head_dim) for s in shards)
        self.page_bytes = page_elements * self.dtype.itemsize
        is_cpu_float32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.attention = _gpu_attention(self.block_size, spec, self.dtype) if self.device.type == "cuda" else \
            AttentionKernels(self.block_size, spec.head_dim, self.dtype,
                             decode_kernel=load_paged_decode() if is_cpu_float32 else None)
        if self.attention.ragged_kernel is not None:  # decode steps padded to the buckets graphs are captured for
            self.attention = replace(self.attention, decode_buckets=decode_buckets(config.max_step_rows))
        self.num_padding_pages = 1 if self.attention.decode_buckets else 0
        # Without a set size, a pool just large enough for the profiling step comes first.
        self._profile = None if config.kv_cache_bytes is not None else ProfileStep.largest(config)
        kv_bytes = config.kv_cache_bytes or self._profile.num_blocks(self.block_size) * self.page_bytes
        self.kv_arena = KVArena(kv_bytes, page_elements, self.dtype, self.device, self.num_padding_pages)
        self._step_limits = (config.max_step_tokens, config.max_step_rows, config.max_model_len or spec.max_position)
        self._make_step_buffers()
        context = StageContext(spec=spec, device=self.device, dtype=self.dtype,
                               inv_freq=inverse_frequencies(spec.rope, spec.head_dim).to(self.device))
        self.sampled: SampledTokens | None = None  # the last step's tokens, for rows that await them
        kernels = _gpu_kernels(spec, self.block_size) if self.device.type == "cuda" else LayerKernels()
        self.states: dict[Layout, LayoutState] = {}
        for shard in shards:
            model = ShardModel(spec, shard, self.weight_arena.allocator(self.dtype), kernels)
            pages = self.kv_arena.pages(shard, self.block_size, spec.head_dim)
            self.states[shard.layout] = LayoutState(shard, model, pages, communicators, context)
        self.current = self.states[shards[0].layout]
        self.sampler = Sampler(self.device, seed=config.seed, race=_gpu_race() if self.device.type == "cuda" else None)
        self.counts = TokenCounts(self.device, spec.vocab_size)
        with self.copies.computing():
            self.copies.load_weights(self.current.model, weights)
            if self.attention.ragged_kernel is not None:
                _warm_up_triton([state.shard for state in self.states.values()], spec, self.block_size, self.dtype,
                                self.device)
        if self._profile is not None:
            self._size_kv_pool(config.memory_fraction, page_elements)
        self.load_s = time.perf_counter() - started

    def bind_thread(self) -> None:
        """Make this worker's GPU the calling thread's current device. Every thread that touches
        the device calls it first: a thread starts on GPU 0, and a stream context entered there
        would switch back to GPU 0 on exit, making a context on a GPU that is not this worker's."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _make_step_buffers(self) -> None:
        """The device block table and the upload buffer, allocated once for the KV pool as it is
        (fixed addresses, which captured CUDA graphs read in place)."""
        max_tokens, max_rows, max_model_len = self._step_limits
        self.bounds = StepBounds.for_worker(max_tokens, max_rows, self.kv_arena.num_blocks, max_model_len,
                                            self.block_size)
        is_ragged = self.attention.ragged_kernel is not None
        self.block_tables = BlockTables(self.device, mirrored=is_ragged, bounds=self.bounds)
        self.uploader = Uploader(self.device, self.bounds.upload_values(is_ragged))

    @property
    def num_blocks(self) -> int:
        """Device KV blocks; a block id names the same bytes under every layout."""
        return self.kv_arena.num_blocks

    @property
    def is_sampling(self) -> bool:
        return self.current.is_sampling

    def warm_up_groups(self) -> None:
        """Every communicator group the run's layouts use carries what a step sends through it
        (an all-reduce, or a pass down the pipeline) at each size steps send: one row, the row cap,
        the token budget. NCCL allocates its buffers for a group (and each algorithm it picks by
        size) on first use, outside torch's allocator: after this they are in the memory in use.
        Collective: every rank of the replica calls it at the same point."""
        max_tokens, max_rows, _ = self._step_limits
        with self.copies.computing(), torch.inference_mode():
            for kind, communicator in group_uses(self.states.values()):
                for num_rows in sorted({1, max_rows, max_tokens}):
                    probe = torch.zeros(num_rows, self.spec.hidden_size, dtype=self.dtype, device=self.device)
                    if kind == "tp":
                        communicator.all_reduce(probe)
                    else:
                        pass_along(communicator, probe)

    def _size_kv_pool(self, memory_fraction: float, page_elements: int) -> None:
        """Warm the communicator groups, run the largest step the scheduler may plan, then give the
        KV pool what is left of `memory_fraction` of the card beyond everything in use (weights,
        NCCL's buffers, other processes) and that step's peak of activations, workspaces and
        sampler buffers. Each block brings its share of the step buffers, which are then made once
        for the pool's size; the padding page comes out too."""
        self.warm_up_groups()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        self.execute(self._profile.rows(self.block_size))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self.block_tables = self.uploader = self.sampled = None
        for state in self.states.values():
            state.kv_pages = None
        self.kv_arena = None
        torch.cuda.empty_cache()
        memory = DeviceMemory(*torch.cuda.mem_get_info(self.device))
        kv_bytes = kv_pool_bytes(memory, memory_fraction, peak)
        per_block = self.page_bytes + step_bytes_per_block(self._step_limits[2], self.block_size)
        num_blocks = max(0, kv_bytes - self.num_padding_pages * self.page_bytes) // per_block
        log.info("profiling step: %.2f GiB of activations; %.2f GiB of %.2f GiB in use (NCCL's buffers included); "
                 "KV pool %.2f GiB (%d blocks)", peak / GIB, memory.in_use_bytes / GIB, memory.total_bytes / GIB,
                 kv_bytes / GIB, num_blocks)
        if num_blocks < 2:
            raise ValueError(
                f"no room for a KV pool on {self.device}: {memory_fraction:.0%} of its "
                f"{memory.total_bytes / GIB:.1f} GiB, less {memory.in_use_bytes / GIB:.1f} GiB in use and "
                f"{peak / GIB:.1f} GiB for the largest step, leaves "
                f"{max(kv_bytes, 0) / GIB:.2f} GiB (raise --memory-fraction, lower --max-num-batched-tokens "
                f"or --max-num-seqs, or use more GPUs)")
        self.kv_arena = KVArena(num_blocks * self.page_bytes, page_elements, self.dtype, self.device,
                                self.num_padding_pages)
        self._make_step_buffers()
        for state in self.states.values():
            state.kv_pages = self.kv_arena.pages(state.shard, self.block_size, self.spec.head_dim)
        self._profile = None

    # ------------------------------------------------------------ steps

    def execute(self, rows: list[StepRow], released: list[str] = ()) -> PendingTokens | None:
        """One forward pass of this stage over the rows' new tokens. Every rank of the last stage
        samples (each holds the gathered logits, and at one stage the next step's rows may await
        the tokens); the sampling rank returns them, with the log-probabilities rows asked for, on
        their way to the host, others None. On a GPU all of it (the upload, kernels, collectives,
        the copy of the tokens) runs on the compute stream."""
        with self.copies.computing():
            inputs = self.inputs(rows, released)
            self.counts.forget(released)
            if self.current.shard.is_last_stage:
                self.counts.take(rows)
            output = self.current.forward(inputs)
            if output is None or not inputs.sampled_ids:
                self.sampled = None
                if not self.is_sampling:
                    return None
                return PendingTokens(torch.empty(0, dtype=torch.long), self.device, prompt=_prompt_part(inputs, output))
            samplings = [row.sampling for row in rows if row.sampling is not None]
            with torch.inference_mode():
                tokens, logprobs = self._sample(output.logits, samplings, inputs.sampled_ids)
            self.sampled = SampledTokens({request_id: i for i, request_id in enumerate(inputs.sampled_ids)}, tokens)
            if not self.is_sampling:
                return None
            return PendingTokens(tokens, self.device, logprobs, _prompt_part(inputs, output))

    def _sample(self, logits: torch.Tensor, rows: list[RowSampling], request_ids: list[str]):
        """The sampled tokens [rows] of the rows' adjusted logits, and the log-probabilities (of the
        model's own logits) of the rows that ask: (their places, chosen, top values, top ids, tops)."""
        counted = [index for index, row in enumerate(rows) if row.adjustments and row.adjustments.counts_tokens]
        counted_ids = [request_ids[index] for index in counted]
        history = self.counts.history(counted_ids) if counted else None
        tokens = self.sampler.sample(adjusted_logits(logits, rows, history, self.sampler.upload), rows)
        if counted:
            self.counts.add(counted_ids, tokens.index_select(0, torch.tensor(counted, device=tokens.device)))
        asked = [index for index, row in enumerate(rows) if row.logprobs is not None]
        if not asked:
            return tokens, None
        tops = [rows[index].logprobs for index in asked]
        places = torch.tensor(asked, device=logits.device)
        values = token_logprobs(logits.index_select(0, places), tokens.index_select(0, places), max(tops))
        return tokens, (asked, *values, tops)

    def inputs(self, rows: list[StepRow], released: list[str] = ()) -> StepInputs:
        """The step's inputs on this worker's device (block tables updated by the rows' deltas)."""
        with torch.inference_mode():
            return build_step_inputs(rows, list(released), self.block_tables, self.sampled, self.attention,
                                     self.uploader)

    def reshard(self, layout: Layout) -> tuple[float, int]:
        """Switch to `layout`; returns (seconds, bytes copied), nothing if it is already current."""
        if self.states[layout] is self.current:
            return 0.0, 0
        return self.load(layout)

    def load(self, layout: Layout) -> tuple[float, int]:
        """Lay `layout`'s shard over the weight arena and fill it from the weight source, layer by
        layer, whatever the arena held; returns (seconds, bytes copied)."""
        started = time.perf_counter()
        target = self.states[layout]
        with self.copies.computing():  # weights drawn on the device are drawn on the compute stream
            num_bytes = self.copies.load_weights(target.model, self.weights)
        self.current = target
        return time.perf_counter() - started, num_bytes

    # ------------------------------------------------------------ KV copies

    def swap_out(self, layout: Layout, block_ids: list[int], host_block_ids: list[int]) -> int:
        """Copy this worker's share of device blocks (laid out in `layout`) into host blocks; returns bytes."""
        state = self.states[layout]
        share = _host_share(self.host_buffer, state)  # [host blocks, layers, 2, kv_heads, block_size, head_dim]
        pairs = list(zip(block_ids, self.host_buffer.local(host_block_ids)))
        return self.copies.kv_copy([(share[h], state.kv_pages[b]) for b, h in pairs])

    def prefetch(self, layout: Layout, host_block_ids: list[int], block_ids: list[int]) -> int:
        """Copy this worker's share of host blocks into device blocks laid out in `layout`; returns bytes."""
        state = self.states[layout]
        share = _host_share(self.host_buffer, state)
        pairs = list(zip(self.host_buffer.local(host_block_ids), block_ids))
        return self.copies.kv_copy([(state.kv_pages[b], share[h]) for h, b in pairs])

    def close(self) -> None:
        self.copies.close()
        if self.host_buffer is not None:
            self.host_buffer.close()
        if isinstance(self.weights, WeightStore):
            self.weights.close()
        leave_groups(self.communicators)


@dataclass(frozen=True)
class ProfileStep:
    """The largest step the scheduler may plan: its whole token budget, spread over as many rows
    as it may run, every row sampling with temperature, top-k and top-p (so the logits and the
    sampler's sort buffers are as large as they get too)."""

    num_tokens: int
    num_rows: int

    @classmethod
    def largest(cls, config: RuntimeConfig) -> ProfileStep:
        return cls(config.max_step_tokens, max(1, min(config.max_step_rows, config.max_step_tokens)))

    @property
    def request_ids(self) -> list[str]:
        return [f"profile-{index}" for index in range(self.num_rows)]

    def num_blocks(self, block_size: int) -> int:
        return sum(-(-length // block_size) for length in self._lengths())

    def _lengths(self) -> list[int]:
        share, extra = divmod(self.num_tokens, self.num_rows)
        return [share + (index < extra) for index in range(self.num_rows)]

    def rows(self, block_size: int) -> list[StepRow]:
        rows, first = [], 0
        for request_id, length in zip(self.request_ids, self._lengths()):
            count = -(-length // block_size)
            rows.append(StepRow(request_id, [0] * length, 0, list(range(first, first + count)),
                                sampling=RowSampling(1.0, top_p=0.9, top_k=50)))
            first += count
        return rows


class PendingTokens:
    """A step's sampled tokens, and the log-probabilities its rows asked for, on their way to the
    host: on GPUs an asynchronous copy into pinned memory on the current (compute) stream, so the
    worker can start its next step before they land; `wait` returns them."""

    def __init__(self, tokens: torch.Tensor, device: torch.device, logprobs=None, prompt=None):
        # tokens: [sampled rows] on `device`; logprobs: (places, chosen, top values, top ids, tops);
        # prompt: (spans, chosen, top values, top ids) of scored prompt places
        self._event = None
        self._logprobs = None if logprobs is None else (logprobs[0], logprobs[4])
        self._prompt_spans = None if prompt is None else prompt[0]
        values = [tokens]
        if logprobs is not None:
            values += list(logprobs[1:4])
        if prompt is not None:
            values += list(prompt[1:])
        self._host = values
        if device.type == "cuda":
            self._host = [torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for value in values]
            for host, value in zip(self._host, values):
                host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> SampledResult:
        if self._event is not None:
            self._event.synchronize()
        lists = [value.tolist() for value in self._host]
        tokens, rest = lists[0], lists[1:]
        logprobs: list[TokenLogprobs | None] = []
        if self._logprobs is not None:
            places, tops = self._logprobs
            logprobs = [None] * len(tokens)
            for place, entry in zip(places, as_entries(*rest[:3], tops)):
                logprobs[place] = entry
            rest = rest[3:]
        prompt = []
        if self._prompt_spans is not None:
            tops = [top for _, _, count, top in self._prompt_spans for _ in range(count)]
            entries = as_entries(*rest[:3], tops)
            first = 0
            for request_id, position, count, _ in self._prompt_spans:
                prompt.append(PromptLogprobs(request_id, position, entries[first : first + count]))
                first += count
        return SampledResult(tokens, logprobs, prompt)


@dataclass(frozen=True)
class SampledResult:
    """What a step sends back: one token per sampling row, each row's log-probabilities where it
    asked (else None; empty when no row asked), and the scored prompt chunks."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: list[PromptLogprobs]


def _prompt_part(inputs, output):
    """The scored prompt places of a step for PendingTokens: (spans, chosen, top values, top ids), or None."""
    if output is None or output.prompt_scores is None:
        return None
    return (inputs.scoring.spans, *output.prompt_scores)


def _host_share(host_buffer: HostBuffer | None, state: LayoutState) -> torch.Tensor:
    if host_buffer is None:
        raise ValueError("this engine has no host KV buffer (--host-buffer-gb 0)")
    layers, heads = state.shard.layers, state.shard.kv_heads
    return host_buffer.blocks[:, layers.start : layers.end, :, heads.start : heads.end]


def triton_limits(spec: ModelSpec, block_size: int) -> list[str]:
    """Why the Triton kernels cannot run this model with this block size (empty when they can)."""
    problems = []
    if block_size < 16 or block_size & (block_size - 1):
        problems.append(f"the attention kernel needs a block size that is a power of two of at least 16, "
                        f"got --block-size {block_size}")
    if spec.head_dim < 16 or spec.head_dim & (spec.head_dim - 1):
        problems.append(f"the attention kernel needs a head_dim that is a power of two of at least 16; "
                        f"this model's is {spec.head_dim}")
    if spec.hidden_size > 8192:
        problems.append(f"the norm kernel holds a row of at most 8,192 values; this model's hidden size is "
                        f"{spec.hidden_size}")
    return problems


def _gpu_kernels(spec: ModelSpec, block_size: int) -> LayerKernels:
    """RMSNorm (with the residual add before it), the rotation and the MLP's activation as Triton
    kernels, or torch's where Triton is missing or the model is past the kernels' limits."""
    try:
        from seesaw.model.triton_mlp import silu_mul_triton
        from seesaw.model.triton_norm import add_rms_norm_triton, rms_norm_triton
        from seesaw.model.triton_rope import apply_rotation_triton
    except ImportError:
        return LayerKernels()
    if triton_limits(spec, block_size):
        return LayerKernels()
    return LayerKernels(rms_norm_triton, add_rms_norm_triton, apply_rotation_triton, silu_mul_triton)


def _gpu_attention(block_size: int, spec: ModelSpec, dtype: torch.dtype) -> AttentionKernels:
    """The Triton paged-attention kernel and KV writer, or the torch path (said once, at start)
    where Triton is missing or the model or block size is past the kernels' limits."""
    try:
        from seesaw.model.triton_attention import paged_attention_triton, write_kv_triton
    except ImportError:
        log.warning("triton is not importable: attention runs on the torch reference path")
        return AttentionKernels(block_size, spec.head_dim, dtype)
    problems = triton_limits(spec, block_size)
    if problems:
        log.warning("the Triton kernels are not used (%s): the torch reference path runs instead, much slower",
                    "; ".join(problems))
        return AttentionKernels(block_size, spec.head_dim, dtype)
    return AttentionKernels(block_size, spec.head_dim, dtype, ragged_kernel=paged_attention_triton,
                            kv_writer=write_kv_triton, group=spec.num_heads // spec.num_kv_heads)


def _gpu_race():
    """The sampling race kernel (every random row of a step in one launch), or None without Triton."""
    try:
        from seesaw.model.triton_sampling import exponential_race_triton
    except ImportError:
        return None
    return exponential_race_triton


def _warm_up_triton(shards, spec: ModelSpec, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every Triton variant the run's layouts launch now, while loading, not mid-run."""
    from seesaw.model.triton_attention import warm_up
    from seesaw.model.triton_mlp import silu_mul_triton
    from seesaw.model.triton_norm import add_rms_norm_triton, rms_norm_triton
    from seesaw.model.triton_rope import apply_rotation_triton
    from seesaw.model.triton_sampling import exponential_race_triton

    group = spec.num_heads // spec.num_kv_heads
    hidden = torch.zeros(1, spec.hidden_size, dtype=dtype, device=device)  # [1, hidden]
    rms_norm_triton(hidden, hidden[0], spec.rms_norm_eps)
    add_rms_norm_triton(hidden, hidden, hidden[0], spec.rms_norm_eps)
    angles = torch.zeros(1, spec.head_dim, dtype=dtype, device=device)  # [1, head_dim]
    for shard in shards:
        heads = shard.heads.size + shard.kv_heads.size
        apply_rotation_triton(torch.zeros(1, heads, spec.head_dim, dtype=dtype, device=device), angles, angles)
        silu_mul_triton(torch.zeros(1, 2 * shard.ffn.size, dtype=dtype, device=device))
    for num_kv_heads in sorted({shard.kv_heads.size for shard in shards}):
        warm_up(num_kv_heads * group, num_kv_heads, spec.head_dim, block_size, dtype, device)
    probs = torch.full((1, spec.vocab_size), 1.0 / spec.vocab_size, device=device)  # [1, vocab]
    exponential_race_triton(probs, torch.zeros(1, dtype=torch.int64, device=device))


def device_for(kind: str, device_index: int) -> torch.device:
    """The worker's device: this host's GPU `device_index` (its local rank), or the CPU."""
    if kind == "cuda":
        count = torch.cuda.device_count()
        if not 0 <= device_index < count:
            raise ValueError(f"this worker's local rank is {device_index}, but this host has {count} GPUs")
        return torch.device("cuda", device_index)
    return torch.device(kind)
