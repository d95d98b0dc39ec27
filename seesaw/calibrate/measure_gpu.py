"""Calibration of one CUDA device: its bf16 rates timed with CUDA events, against the datasheet
peaks of the catalogue entry it matches, the host link timed with pinned-memory copies, the
engine's per-step overhead on the device, then the fits to real engine runs that a CPU calibration
makes (`measure.py`), at shapes that keep a GPU busy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields

from seesaw.sim.catalog import GB, Catalog, Gpu, catalogue_name
from seesaw.calibrate.measure import FitRuns, fit_host_link_to_engine, fit_to_engine, scaled_rates, step_overhead_ms

GIB = 1 << 30
# A model of 8B parameters at a full token budget: steps long enough that the GPU, not Python, sets
# their time. Each run is a few seconds on a datacenter GPU.
GPU_RUNS = FitRuns(model="dummy:llama3-8b", device="cuda", token_budget=8192, host_buffer_gb=8.0,
                   prefill=(128, 1024, 2), decode=(256, 16, 128), copies=(256, 256, 4))

def gpu_entry(base: Gpu, rates: dict, overhead_ms: float, host_link: str) -> dict:
    """A profile entry from measured rates: the base entry's datasheet peaks, the measured rates as
    shares of them, the memory the driver reports, the measured step overhead and host link."""
    entry = {field.name: getattr(base, field.name) for field in fields(Gpu) if field.name != "name"}
    entry.update(
        host_link=host_link,
        visible_memory_gib=rates["total_memory"] / GIB,
        matmul_efficiency=rates["model_matmul_flops"] / (base.peak_tflops * 1e12),
        memory_efficiency=rates["weight_stream_bandwidth"] / (base.memory_bandwidth_gbs * GB),
        attention_efficiency=rates["attention_flops"] / (base.peak_tflops * 1e12),
        step_overhead_ms=overhead_ms,
        row_overhead_us=0.0,
        device="cuda",
        source=f"calibrated on an {rates['device_name']}: bf16 rates as shares of the {base.name} datasheet's, "
               f"fitted to engine runs of {GPU_RUNS.model}",
    )
    return scaled_rates(entry, 1.0)  # a rate past the datasheet's (a faster part) raises the peak


def _event_s(run: Callable[[], object], repeats: int = 5, min_s: float = 0.02) -> float:
    """The fastest of `repeats` timings of `run` on the current CUDA stream, each repeated until
    it lasts `min_s` (CUDA events: no host synchronization inside a timing)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    start.record()
    run()
    end.record()
    end.synchronize()
    count = max(1, math.ceil(min_s / max(1e-6, start.elapsed_time(end) / 1000)))
    best = float("inf")
    for _ in range(repeats):
        start.record()
        for _ in range(count):
            run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / count)
    return best


def cuda_rates(hidden: int, intermediate: int, token_budget: int) -> dict:
    """bf16 rates of CUDA device 0 at the shapes a model of this size runs, its copy rates to and
    from pinned host memory, and what it is."""
    import torch

    device, dtype = torch.device("cuda", 0), torch.bfloat16
    torch.manual_seed(0)
    big = torch.randn(8192, 8192, device=device, dtype=dtype)
    peak = 2 * 8192**3 / _event_s(lambda: big @ big)
    weight = torch.randn(intermediate, hidden, device=device, dtype=dtype)
    rates = []
    for rows in (64, token_budget // 2, token_budget):
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        rates.append(2 * rows * hidden * intermediate / _event_s(lambda x=x: x @ weight.T))
    vector = torch.randn(1, hidden, device=device, dtype=dtype)
    stream = weight.numel() * weight.element_size() / _event_s(lambda: vector @ weight.T)  # reads the weight once
    heads, head_dim, tokens = max(1, hidden // 128), 128, min(token_budget, 4096)
    q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
    attention = 2 * heads * head_dim * tokens * tokens / _event_s(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    on_device, target = torch.empty(1 << 30, dtype=torch.uint8, device=device), torch.empty(1 << 30, dtype=torch.uint8, device=device)
    copy = 2 * on_device.numel() / _event_s(lambda: target.copy_(on_device))  # read and write
    pinned = torch.empty(on_device.numel(), dtype=torch.uint8, pin_memory=True)
    to_device = pinned.numel() / _event_s(lambda: on_device.copy_(pinned, non_blocking=True))
    to_host = pinned.numel() / _event_s(lambda: pinned.copy_(on_device, non_blocking=True))
    properties = torch.cuda.get_device_properties(device)
    return {"peak_flops": peak, "model_matmul_flops": sum(rates) / len(rates), "copy_bandwidth": copy,
            "weight_stream_bandwidth": stream, "attention_flops": attention,
            "host_bandwidth": (to_device + to_host) / 2, "total_memory": properties.total_memory,
            "device_name": properties.name}


def calibrate_cuda(like: str | None = None, name: str | None = None, log: Callable[[str], None] = print,
                   catalog: Catalog | None = None, overhead_model: str = "dummy:tiny") -> dict:
    """Measure CUDA device 0 and return a profile file's content: its device entry (named as its
    catalogue entry unless `name` is given, so `plan` uses it in that entry's place) and host link."""
    import torch

    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model

    if not torch.cuda.is_available():
        raise ValueError("calibrate --device cuda needs a CUDA device; torch sees none here")
    catalog = catalog or Catalog()
    device_name = torch.cuda.get_device_name(0)
    like = like or catalogue_name(device_name)
    if like is None:
        raise ValueError(f"{device_name} is not in the catalogue: give --like with the entry whose datasheet "
                         f"peaks it has ({', '.join(gpu.name for gpu in catalog.gpus.values())})")
    base = catalog.gpu(like)
    name = name or base.name
    spec = resolve_model(GPU_RUNS.model, default_cache_dir()).spec
    overhead_ms = step_overhead_ms(overhead_model, log, device="cuda")
    rates = cuda_rates(spec.hidden_size, spec.intermediate_size, GPU_RUNS.token_budget)
    log(f"{device_name} ({rates['total_memory'] / GIB:.1f} GiB): peak {rates['peak_flops'] / 1e12:.0f} TFLOP/s, "
        f"model-shaped {rates['model_matmul_flops'] / 1e12:.0f} TFLOP/s, attention {rates['attention_flops'] / 1e12:.0f} "
        f"TFLOP/s, copy {rates['copy_bandwidth'] / GB:.0f} GB/s, weight stream {rates['weight_stream_bandwidth'] / GB:.0f} "
        f"GB/s, pinned host copies {rates['host_bandwidth'] / GB:.1f} GB/s (against the {base.name} datasheet's "
        f"{base.peak_tflops:g} TFLOP/s and {base.memory_bandwidth_gbs:g} GB/s)")
    host_name = f"{name}-host"
    links = {host_name: {"bandwidth_gbs": rates["host_bandwidth"] / GB, "efficiency": 1.0, "latency_us": 0.0,
                         "source": f"calibrated: 1 GiB copies to and from pinned host memory on an {device_name}"}}
    entry = fit_to_engine(name, gpu_entry(base, rates, overhead_ms, host_name), links, spec, GPU_RUNS, log)
    links[host_name] = fit_host_link_to_engine(name, entry, links, host_name, spec, 1, GPU_RUNS, log)
    return {"about": f"written by seesaw-cli calibrate --device cuda on an {device_name}", "gpus": {name: entry},
            "links": links}
