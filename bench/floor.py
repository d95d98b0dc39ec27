"""How fast a run could possibly go on this device: the bench's yardstick.

A decode step must read every weight and every attended token's KV once (bytes over the copy
bandwidth) and do two FLOPs per weight per row (FLOPs over the matmul rate): its floor is the
larger. Prefill must do two FLOPs per weight per prompt token, plus attention. Both rates are measured here, on the device, in the same run as the throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from seesaw.stats import Totals


@dataclass(frozen=True)
class DeviceRates:
    copy_bytes_per_s: float  # bytes read plus written per second by a large device-to-device copy
    matmul_flops_per_s: float


def measure_rates(device: str, dtype_name: str) -> DeviceRates:
    import torch

    dtype = getattr(torch, dtype_name)
    is_cuda = device == "cuda"
    num_bytes = (1 << 30) if is_cuda else (512 << 20)  # past any cache
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    size = 8192 if is_cuda else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def timed(work, repeats: int) -> float:
        work()
        if is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        if is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats

    copy_s = timed(lambda: target.copy_(source), 10)
    matmul_s = timed(lambda: a @ b, 10)
    return DeviceRates(2 * num_bytes / copy_s, 2 * size**3 / matmul_s)


def weight_elements(spec) -> tuple[int, int]:
    """(elements of the weights a decode step reads: layers and output head; of one layer)."""
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layer = spec.hidden_size * (q_size + 2 * kv_size) + q_size * spec.hidden_size \
        + 3 * spec.hidden_size * spec.intermediate_size
    return spec.num_layers * layer + spec.vocab_size * spec.hidden_size, layer


@dataclass(frozen=True)
class Floors:
    prefill_s: float
    decode_s: float  # every decode step of the run
    decode_step_s: float  # the run's decode steps as measured, at their floor

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def floors(spec, dtype_bytes: int, rates: DeviceRates, num_prompts: int, input_len: int, output_len: int,
           max_num_seqs: int, totals: Totals) -> Floors:
    """The run's floor (all requests decoding together, in as few batches as max_num_seqs allows),
    and the floor of the decode-only steps the engine counted in `totals`. A decode step's floor is
    the larger of its bytes at the copy rate and its FLOPs at the matmul rate (on a CPU, FLOPs)."""
    step_elements, layer_elements = weight_elements(spec)
    weight_bytes = step_elements * dtype_bytes
    kv_bytes_per_token = spec.kv_bytes_per_token // 4 * dtype_bytes
    attention_flops_per_token = 4 * spec.num_layers * spec.num_heads * spec.head_dim  # q.k and p.v, per key

    def decode_s(num_steps: int, num_rows: int, context_tokens: int) -> float:
        read_s = (num_steps * weight_bytes + context_tokens * kv_bytes_per_token) / rates.copy_bytes_per_s
        flops = 2 * step_elements * num_rows + attention_flops_per_token * context_tokens
        return max(read_s, flops / rates.matmul_flops_per_s)

    # Per prompt token: two FLOPs per layer weight, and attention over half the prompt on average.
    prefill_flops = num_prompts * input_len * (2 * spec.num_layers * layer_elements
                                               + attention_flops_per_token * input_len // 2)
    batches = -(-num_prompts // max_num_seqs)
    context_tokens = num_prompts * sum(input_len + t for t in range(1, output_len))
    return Floors(
        prefill_flops / rates.matmul_flops_per_s,
        decode_s(batches * (output_len - 1), num_prompts * (output_len - 1), context_tokens),
        decode_s(totals.decode_steps, totals.decode_rows, totals.decode_context_tokens),
    )


def floor_lines(result: dict, rates: DeviceRates, found: Floors) -> list[str]:
    lines = [
        f"device: copies at {rates.copy_bytes_per_s / 1e9:.1f} GB/s, matmuls at {rates.matmul_flops_per_s / 1e12:.2f} TFLOP/s",
        f"run floor {found.total_s:.2f} s (prefill {found.prefill_s:.2f} s, decode {found.decode_s:.2f} s): "
        f"elapsed is {result['elapsed_time'] / found.total_s:.2f}x the floor",
    ]
    if result.get("decode_steps"):
        mean_ms = 1000 * result["decode_s"] / result["decode_steps"]
        lines.append(f"decode-only steps: {result['decode_steps']}, {mean_ms:.1f} ms each, "
                     f"{result['decode_s'] / found.decode_step_s:.2f}x their floor")
    return lines
