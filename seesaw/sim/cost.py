"""The cost model: how long one pipeline stage of a step takes, and how long KV copies and weight
reloads take, from a model's shape and a node's profile (pure). Every term has a name, so a
prediction can be read back term by term."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from seesaw.kv.host_sizing import HostBufferPlan, NodeMemory
from seesaw.kv.host_sizing import auto_host_buffer as auto_sized
from seesaw.layout import Layout, Shard, shard_for, validate
from seesaw.model.spec import ModelSpec
from seesaw.sim.catalog import GB, Link, Node
from seesaw.step import StepShape, step_shape

GIB = 1 << 30
# A step's messages between the head and workers on other nodes, as the engine's codec writes them
# (orjson, measured): each row of a RunStep with its sampling, each new token's id (with its share of
# new block ids), and each token a StepDone brings back, beside the message's own fields.
ROW_BYTES = 300
TOKEN_BYTES = 7
SAMPLED_BYTES = 7
MESSAGE_BYTES = 100


@dataclass(frozen=True)
class StageRates:
    """One pipeline stage's step terms as rates: what a step costs whatever its shape, and what
    each new token, context token, query-key pair, row and sampled row adds."""

    num_layers: int
    weight_read_s: float
    linear_s_per_token: float
    attention_read_s_per_token: float  # reading one context token's KV
    attention_s_per_pair: float
    all_reduce_s: float  # the all-reduces' latency
    all_reduce_s_per_token: float
    overhead_s: float
    row_overhead_s: float  # per row
    head_read_s: float  # the LM head's weights (last stage only, as are the next three)
    head_s_per_sampled: float
    gather_s: float  # the logits all-gather's latency
    gather_s_per_sampled: float


def _layers_and_head_s(rates: StageRates, shape: StepShape) -> tuple[float, float]:
    """A stage's time for a step, in two parts: its layers (weights against linear arithmetic, KV
    reads against attention arithmetic, whichever is slower in each pair; all-reduces; rows), and
    the LM head and logits gather of a last stage (zero elsewhere and for steps that sample none)."""
    num_tokens, sampled = shape.num_tokens, shape.num_sampled
    layers_s = (max(rates.weight_read_s, rates.linear_s_per_token * num_tokens)
                + max(rates.attention_read_s_per_token * shape.context_tokens,
                      rates.attention_s_per_pair * shape.attention_pairs)
                + rates.all_reduce_s + rates.all_reduce_s_per_token * num_tokens
                + rates.row_overhead_s * shape.num_rows)
    head_s = 0.0
    if sampled:
        head_s = (max(rates.head_read_s, rates.head_s_per_sampled * sampled)
                  + rates.gather_s + rates.gather_s_per_sampled * sampled)
    return layers_s, head_s


class CostModel:
    """Seconds for the work of one model under its layouts on one node, or on identical nodes
    joined by `node_link`."""

    def __init__(self, spec: ModelSpec, node: Node, node_link: Link | None = None):
        self.spec = spec
        self.node = node
        self.node_link = node_link
        self.gpu = node.gpu
        self.dtype_bytes = node.gpu.dtype_bytes
        self._shards: dict[tuple[Layout, int], Shard] = {}
        self._stage_layers: dict[Layout, tuple[int, ...]] = {}
        self._rates: dict[tuple[Layout, int], StageRates] = {}
        self._timings: dict[Layout, tuple[StageRates, tuple[int, ...]]] = {}  # last stage's rates, other stages' layers
        link = node.interconnect  # a pipeline send: one token's activations per new token, and a hop
        self._token_bytes = spec.hidden_size * self.dtype_bytes  # one token's activations
        self._send_bandwidth, self._send_latency_s = link.copy_bandwidth, link.latency_s

    # ------------------------------------------------------------ shapes and bytes

    def shard(self, layout: Layout, stage: int) -> Shard:
        """The largest shard of a pipeline stage (tp rank 0 gets any extra heads and columns)."""
        key = (layout, stage)
        shard = self._shards.get(key)
        if shard is None:
            validate(layout, self.spec.shape)
            shard = self._shards[key] = shard_for(layout, self.spec.shape, layout.rank_of(0, stage, 0))
        return shard

    def layer_params(self, shard: Shard) -> int:
        """Parameters of one decoder layer's slice: q, k, v, o and the gated MLP."""
        hidden, head_dim = self.spec.hidden_size, self.spec.head_dim
        attention = hidden * head_dim * (2 * shard.heads.size + 2 * shard.kv_heads.size)
        return attention + 3 * hidden * shard.ffn.size

    def shard_bytes(self, layout: Layout, stage: int) -> int:
        """Weight bytes one worker of a stage holds, as the engine's shards allocate them: its
        layers, the whole embedding table on the first stage, and on the last the LM head's
        vocabulary slice (padded to equal slices; a tied head on a lone worker reuses the table)."""
        shard = self.shard(layout, stage)
        hidden = self.spec.hidden_size
        params = shard.layers.size * self.layer_params(shard)
        if shard.is_first_stage:
            params += self.spec.vocab_size * hidden
        reuses_table = self.spec.tie_word_embeddings and shard.is_first_stage and layout.tp == 1
        if shard.is_last_stage and not reuses_table:
            params += shard.vocab_rows_padded * hidden
        return params * self.dtype_bytes

    @cached_property
    def model_bytes(self) -> int:
        return self.shard_bytes(Layout(), 0)

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token across the whole model."""
        return self.spec.num_layers * 2 * self.spec.num_kv_heads * self.spec.head_dim * self.dtype_bytes

    def block_bytes(self, layout: Layout, block_size: int) -> int:
        """Bytes of one device KV block on the largest worker of a layout."""
        shard = self.shard(layout, 0)
        return shard.layers.size * 2 * shard.kv_heads.size * block_size * self.spec.head_dim * self.dtype_bytes

    def kv_share(self, layout: Layout) -> float:
        """The largest share of a request's KV that one worker of the layout holds."""
        shard = self.shard(layout, 0)
        return shard.layers.size * shard.kv_heads.size / (self.spec.num_layers * self.spec.num_kv_heads)

    def device_blocks(self, layouts: list[Layout], block_size: int) -> int:
        """KV blocks per replica: the memory left on the fullest worker after the largest shard
        of any of the run's layouts, cut into pages of the largest block (as the engine does)."""
        page = max(self.block_bytes(layout, block_size) for layout in layouts)
        if self.gpu.kv_cache_gb is not None:
            return int(self.gpu.kv_cache_gb * GIB) // page
        arena = max(self.shard_bytes(layout, stage) for layout in layouts for stage in range(layout.pp))
        free = self.gpu.memory_bytes * self.gpu.memory_fraction - arena - self.gpu.activation_gb * GIB
        if free < page:
            names = " and ".join(str(layout) for layout in layouts)
            raise ValueError(f"{names}: a worker holds {arena / GIB:.1f} GiB of weights, leaving no room for KV "
                             f"on a {self.gpu.memory_gb:g} GB {self.gpu.name}")
        return int(free) // page

    # ------------------------------------------------------------ one step

    def stage_rates(self, layout: Layout, stage: int) -> StageRates:
        """The terms of one pipeline stage's part of a step as rates, on its slowest worker."""
        key = (layout, stage)
        rates = self._rates.get(key)
        if rates is None:
            rates = self._rates[key] = self._stage_rates(layout, stage)
        return rates

    def _stage_rates(self, layout: Layout, stage: int) -> StageRates:
        spec, gpu = self.spec, self.gpu
        shard = self.shard(layout, stage)
        layers = shard.layers.size
        peak = gpu.peak_tflops * 1e12
        params = self.layer_params(shard)
        head_dim = spec.head_dim
        all_reduce_s = layers * 2 * self.all_reduce_s(0, layout.tp)
        head_read_s = head_s_per_sampled = gather_s = gather_s_per_sampled = 0.0
        if shard.is_last_stage:
            head_params = shard.vocab.size * spec.hidden_size
            head_read_s = head_params * self.dtype_bytes / gpu.memory_bandwidth
            head_s_per_sampled = 2 * head_params / (peak * gpu.matmul_efficiency)
            gather_s = self.all_gather_s(0, layout.tp)
            logits_bytes = shard.vocab_rows_padded * layout.tp * 4  # one sampled row's float32 logits
            gather_s_per_sampled = self.all_gather_s(logits_bytes, layout.tp) - gather_s
        return StageRates(
            num_layers=layers,
            weight_read_s=layers * params * self.dtype_bytes / gpu.memory_bandwidth,
            linear_s_per_token=layers * 2 * params / (peak * gpu.matmul_efficiency),
            attention_read_s_per_token=layers * 2 * shard.kv_heads.size * head_dim * self.dtype_bytes
            / gpu.memory_bandwidth,
            attention_s_per_pair=layers * 4 * shard.heads.size * head_dim / (peak * gpu.attention_efficiency),
            all_reduce_s=all_reduce_s,
            all_reduce_s_per_token=layers * 2 * self.all_reduce_s(self._token_bytes, layout.tp) - all_reduce_s,
            overhead_s=gpu.step_overhead_ms / 1000,
            row_overhead_s=gpu.row_overhead_us * 1e-6 * layers / spec.num_layers,
            head_read_s=head_read_s,
            head_s_per_sampled=head_s_per_sampled,
            gather_s=gather_s,
            gather_s_per_sampled=gather_s_per_sampled,
        )

    def stage_terms(self, layout: Layout, stage: int, shape: StepShape) -> dict[str, float]:
        """Seconds of each term of one pipeline stage's part of a step, on its slowest worker."""
        rates = self.stage_rates(layout, stage)
        sampled = shape.num_sampled
        return {
            "weight_read_s": rates.weight_read_s,
            "linear_compute_s": rates.linear_s_per_token * shape.num_tokens,
            "attention_read_s": rates.attention_read_s_per_token * shape.context_tokens,
            "attention_compute_s": rates.attention_s_per_pair * shape.attention_pairs,
            "all_reduce_s": rates.all_reduce_s + rates.all_reduce_s_per_token * shape.num_tokens,
            "lm_head_s": max(rates.head_read_s, rates.head_s_per_sampled * sampled) if sampled else 0.0,
            "logits_gather_s": rates.gather_s + rates.gather_s_per_sampled * sampled if sampled else 0.0,
            "overhead_s": rates.overhead_s,
            "row_overhead_s": rates.row_overhead_s * shape.num_rows,
        }

    def stage_s(self, layout: Layout, stage: int, shape: StepShape) -> float:
        """One stage's time: reading weights and multiplying overlap (the slower one counts), as do
        reading KV and attention arithmetic; communication and overhead add."""
        rates = self.stage_rates(layout, stage)
        layers_s, head_s = _layers_and_head_s(rates, shape)
        return layers_s + head_s + rates.overhead_s

    def stage_times(self, layout: Layout, shape: StepShape) -> list[float]:
        """`stage_s` of every stage of the layout, from the last stage's rates scaled by each
        stage's layer count (the simulator's hot path; equal to calling stage_s per stage)."""
        timing = self._timings.get(layout)
        if timing is None:
            timing = self._timings[layout] = (self.stage_rates(layout, layout.pp - 1), self.stage_layers(layout)[:-1])
        rates, other_stages = timing
        layers_s, head_s = _layers_and_head_s(rates, shape)
        last = layers_s + head_s + rates.overhead_s
        if not other_stages:
            return [last]
        per_layer = layers_s / rates.num_layers
        times = [count * per_layer + rates.overhead_s for count in other_stages]
        times.append(last)
        return times

    def stage_layers(self, layout: Layout) -> tuple[int, ...]:
        """How many layers each pipeline stage of the layout holds."""
        counts = self._stage_layers.get(layout)
        if counts is None:
            counts = self._stage_layers[layout] = tuple(self.shard(layout, stage).layers.size
                                                        for stage in range(layout.pp))
        return counts

    def send_s(self, shape: StepShape) -> float:
        """Handing a step's activations to the next pipeline stage."""
        return shape.num_tokens * self._token_bytes / self._send_bandwidth + self._send_latency_s

    def node_send_s(self, shape: StepShape, tp: int) -> float:
        """Handing a step's activations to the next pipeline stage on another node: each of the
        stage's `tp` workers sends its own copy to its peer, and they share the node link."""
        link = self._node_link()
        return tp * shape.num_tokens * self._token_bytes / link.copy_bandwidth + link.latency_s

    def head_to_node_s(self, shape: StepShape, num_workers: int) -> float:
        """A step's command reaching `num_workers` workers on other nodes: the head sends each its
        own copy, over its node link."""
        link = self._node_link()
        num_bytes = MESSAGE_BYTES + ROW_BYTES * shape.num_rows + TOKEN_BYTES * shape.num_tokens
        return num_workers * num_bytes / link.copy_bandwidth + link.latency_s

    def node_to_head_s(self, shape: StepShape) -> float:
        """A step's sampled tokens reaching the head from a last stage on another node."""
        link = self._node_link()
        return (MESSAGE_BYTES + SAMPLED_BYTES * shape.num_sampled) / link.copy_bandwidth + link.latency_s

    def _node_link(self) -> Link:
        if self.node_link is None:
            raise ValueError("a run over several nodes needs the link between them (a node link)")
        return self.node_link

    def all_reduce_s(self, num_bytes: int, group_size: int) -> float:
        """A ring all-reduce: each device sends and receives 2(n-1)/n of the bytes, in 2(n-1) hops."""
        if group_size == 1:
            return 0.0
        link = self.node.interconnect
        moved = 2 * (group_size - 1) / group_size * num_bytes
        return moved / link.all_reduce_bandwidth(group_size) + 2 * (group_size - 1) * link.latency_s

    def all_gather_s(self, num_bytes: int, group_size: int) -> float:
        """A ring all-gather of `num_bytes` in all: (n-1)/n of them reach each device."""
        if group_size == 1:
            return 0.0
        link = self.node.interconnect
        moved = (group_size - 1) / group_size * num_bytes
        return moved / link.all_reduce_bandwidth(group_size) + (group_size - 1) * link.latency_s

    # ------------------------------------------------------------ host memory traffic

    def kv_copy_s(self, layout: Layout, num_tokens: int) -> float:
        """Copying a request's KV between its device blocks and the host buffer: every worker of the
        replica moves its own share over its own host link at the same time."""
        num_bytes = num_tokens * self.kv_bytes_per_token * self.kv_share(layout)
        return num_bytes / self.node.host_link.copy_bandwidth + self.node.host_link.latency_s

    def reload_s(self, layout: Layout, stage: int) -> float:
        """A worker of `stage` loading its shard of `layout` from the host weight store."""
        return self.shard_bytes(layout, stage) / self.node.host_link.copy_bandwidth


def auto_host_buffer(cost: CostModel, layout: Layout, is_seesaw: bool, reshards: bool, job_tokens: list[int],
                     block_size: int, max_model_len: int, job_scale: float = 1.0) -> HostBufferPlan:
    """The host buffer the engine's `--host-buffer-gb auto` would take on the simulated node (see
    seesaw/kv/host_sizing.py), for a run of `layout` over a job of `job_scale` times requests of
    `job_tokens` tokens at most each; a ValueError when a pair cannot have the least it needs."""
    node, gpu = cost.node, cost.node.gpu
    memory = NodeMemory(node.shm_bytes, node.available_bytes)
    num_workers = layout.world_size
    if gpu.device == "cpu":  # CPU workers hold their weights and KV pools in host memory
        process_bytes = cost.model_bytes + num_workers * (int((gpu.kv_cache_gb or 2.0) * GIB) + GIB // 2)
    else:
        process_bytes = num_workers * GIB
    block_bytes = cost.kv_bytes_per_token * block_size
    job_blocks = round(job_scale * sum(-(-tokens // block_size) for tokens in job_tokens))
    return auto_sized(memory, store_bytes=cost.model_bytes if reshards else 0, process_bytes=process_bytes,
                      min_bytes=-(-max_model_len // block_size) * block_bytes * layout.dp,
                      job_bytes=job_blocks * block_bytes, is_seesaw=is_seesaw, num_workers=num_workers,
                      pool_bytes=int(gpu.kv_cache_gb * GIB) if gpu.kv_cache_gb else None)


__all__ = ["CostModel", "StepShape", "step_shape", "auto_host_buffer", "GB", "GIB"]  # shapes: seesaw.step
