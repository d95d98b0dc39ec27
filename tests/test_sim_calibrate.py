"""Calibration without the hardware: the fits against engine runs given as simulated times at known
figures (they must recover them), and a CUDA device's entry built from measured rates. The
measurements themselves run in `seesaw-cli calibrate` (CPU here; CUDA in tests/test_gpu.py)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from seesaw.calibrate import measure
from seesaw.calibrate.measure_gpu import GPU_RUNS, gpu_entry
from seesaw.sim.catalog import Catalog, catalogue_name
from seesaw_cli.main import app

H200_RATES = {"peak_flops": 800e12, "model_matmul_flops": 650e12, "copy_bandwidth": 4.0e12,
              "weight_stream_bandwidth": 3.6e12, "attention_flops": 400e12, "host_bandwidth": 50e9,
              "total_memory": 143_771 << 20, "device_name": "NVIDIA H200"}


@pytest.mark.parametrize(("device_name", "entry"), [
    ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB-SXM"), ("NVIDIA A100-PCIE-40GB", "A100-40GB-PCIe"),
    ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"), ("NVIDIA A100-SXM4-80GB", "A100-80GB-SXM"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB-PCIe"), ("NVIDIA A10G", "A10G"), ("NVIDIA GeForce RTX 4090", None),
])
def test_a_cuda_device_is_matched_to_its_catalogue_entry_by_name(device_name, entry):
    assert catalogue_name(device_name) == entry


def test_a_cuda_entry_keeps_the_datasheet_and_takes_measured_shares_of_it():
    catalog = Catalog()
    base = catalog.gpu("H200")
    entry = gpu_entry(base, H200_RATES, overhead_ms=2.5, host_link="H200-host")
    assert entry["peak_tflops"] == base.peak_tflops and entry["memory_bandwidth_gbs"] == base.memory_bandwidth_gbs
    assert entry["matmul_efficiency"] == pytest.approx(650 / 989)
    assert entry["attention_efficiency"] == pytest.approx(400 / 989)
    assert entry["memory_efficiency"] == pytest.approx(3600 / 4800)
    assert entry["visible_memory_gib"] == pytest.approx(140.4, abs=0.05)
    assert entry["step_overhead_ms"] == 2.5 and entry["device"] == "cuda" and "NVIDIA H200" in entry["source"]
    # A faster part than the datasheet says raises the peak rather than an efficiency past 1.
    fast = gpu_entry(base, {**H200_RATES, "weight_stream_bandwidth": 5.0e12}, 2.5, "H200-host")
    assert fast["memory_efficiency"] == 1.0 and fast["memory_bandwidth_gbs"] == pytest.approx(5000)
    # What calibrate writes is a profile the catalogue reads, standing in for the shipped entry.
    links = {"H200-host": {"bandwidth_gbs": 50.0, "efficiency": 1.0, "latency_us": 0.0, "source": "test"}}
    catalog.add({"gpus": {"H200": entry}, "links": links}, "calibrated")
    node = catalog.node("8xH200")
    assert node.gpu.matmul_efficiency == pytest.approx(650 / 989) and node.host_link.name == "H200-host"
    assert catalog.node("8xH200", interconnect="pcie5x16").host_link.name == "pcie5x16"  # named slots carry both


def test_scaled_rates_scale_every_rate_and_keep_efficiencies_shares():
    entry = {"peak_tflops": 100.0, "memory_bandwidth_gbs": 1000.0, "matmul_efficiency": 0.8,
             "attention_efficiency": 0.4, "memory_efficiency": 0.9, "other": "kept"}
    slower = measure.scaled_rates(entry, 0.5)
    assert (slower["matmul_efficiency"], slower["attention_efficiency"], slower["memory_efficiency"]) == \
        pytest.approx((0.4, 0.2, 0.45))
    faster = measure.scaled_rates(entry, 1.5)
    assert faster["peak_tflops"] == pytest.approx(120) and faster["matmul_efficiency"] == 1.0
    assert faster["attention_efficiency"] == pytest.approx(60 / 120)
    assert faster["memory_bandwidth_gbs"] == pytest.approx(1350) and faster["memory_efficiency"] == 1.0
    assert faster["other"] == "kept"


def test_device_fit_recovers_the_engines_rates_and_row_overhead_at_gpu_shapes(monkeypatch):
    """calibrate's first fit, at the shapes of a CUDA calibration: an engine whose prefill run is
    the simulation at 70% of the measured rates, and whose decode run also spends 30 us per row,
    must give back those figures."""
    spec = Catalog().model(GPU_RUNS.model.removeprefix("dummy:"))
    links = {"H200-host": {"bandwidth_gbs": 50.0, "efficiency": 1.0, "latency_us": 0.0, "source": "test"}}
    measured = gpu_entry(Catalog().gpu("H200"), H200_RATES, 3.0, "H200-host")
    truth = {**measure.scaled_rates(measured, 0.7), "row_overhead_us": 30.0}
    calls = []

    def engine_run(model, run, num_prompts, input_len, output_len, **options):
        calls.append((model, run, num_prompts, input_len, output_len, options["device"], options["token_budget"]))
        return {"elapsed_s": measure._simulated_run("H200", truth, links, spec, run,
                                                    (num_prompts, input_len, output_len), GPU_RUNS).elapsed_s}

    monkeypatch.setattr(measure, "run_engine", engine_run)
    fitted = measure.fit_to_engine("H200", measured, links, spec, GPU_RUNS, log=lambda line: None)
    assert calls[0] == ("dummy:llama3-8b", "t1", 128, 1024, 2, "cuda", 8192) and len(calls) == 4
    for key in ("matmul_efficiency", "memory_efficiency", "attention_efficiency"):
        assert fitted[key] == pytest.approx(truth[key], rel=0.02)
    assert fitted["row_overhead_us"] == pytest.approx(30.0, rel=0.05)


def test_device_fit_raises_the_memory_rate_alone_when_the_engine_decodes_faster(monkeypatch):
    """A GPU whose memory rate is a larger share of its datasheet than its compute rate: the
    prefill run's scale would make decoding too slow, so the fit raises the memory rate alone (and
    gives no per-row overhead) until the decode run takes as long as the engine's."""
    spec = Catalog().model("llama3-8b")
    links = {"H200-host": {"bandwidth_gbs": 50.0, "efficiency": 1.0, "latency_us": 0.0, "source": "test"}}
    measured = gpu_entry(Catalog().gpu("H200"), H200_RATES, 3.0, "H200-host")
    truth = measure.scaled_rates(measured, 0.6, 0.95)

    def engine_run(model, run, num_prompts, input_len, output_len, **options):
        return {"elapsed_s": measure._simulated_run("H200", truth, links, spec, run,
                                                    (num_prompts, input_len, output_len), GPU_RUNS).elapsed_s}

    monkeypatch.setattr(measure, "run_engine", engine_run)
    lines = []
    fitted = measure.fit_to_engine("H200", measured, links, spec, GPU_RUNS, log=lines.append)
    assert fitted["row_overhead_us"] == 0.0 and "memory rate x" in lines[0]
    assert fitted["matmul_efficiency"] == pytest.approx(truth["matmul_efficiency"], rel=0.03)
    assert fitted["memory_efficiency"] == pytest.approx(truth["memory_efficiency"], rel=0.03)
    decode = measure._simulated_run("H200", fitted, links, spec, "t1", GPU_RUNS.decode, GPU_RUNS).elapsed_s
    assert decode == pytest.approx(engine_run(None, "t1", *GPU_RUNS.decode)["elapsed_s"], rel=0.005)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it would calibrate for minutes")
def test_calibrate_cuda_without_a_device_says_so(tmp_path):
    profile = tmp_path / "h200.json"
    result = CliRunner().invoke(app, ["calibrate", "--device", "cuda", "--output", str(profile)])
    assert result.exit_code == 2 and "needs a CUDA device" in result.output and not profile.exists()
    for flags, message in ((["--device", "cuda", "--workers", "1"], "--workers is for --device cpu"),
                           (["--like", "H200"], "--like is for --device cuda"),
                           (["--device", "tpu"], "--device must be cpu or cuda"),
                           (["--output", str(tmp_path / "no" / "p.json")], "does not exist")):
        result = CliRunner().invoke(app, ["calibrate", *flags])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_written_profile_round_trips_through_json():
    entry = gpu_entry(Catalog().gpu("L4"), {**H200_RATES, "device_name": "NVIDIA L4"}, 4.0, "L4-host")
    catalog = Catalog()
    catalog.add(json.loads(json.dumps({"gpus": {"L4": entry}, "links": {"L4-host": {
        "bandwidth_gbs": 25.0, "efficiency": 1.0, "latency_us": 0.0, "source": "test"}}})), "file")
    assert catalog.node("4xL4").host_link.name == "L4-host"  # its own measured link, on a PCIe node too


def test_calibrate_cuda_fits_a_profile_from_its_measurements(monkeypatch):
    """The CUDA calibration's steps, with the device's measurements and its engine runs stood in
    for (the engine's runs are the simulation at 80% of the measured rates, with copies 2 ms
    slower than the bare link): the profile it returns is what the catalogue reads, in place of the
    shipped H200, fitted to those runs."""
    from seesaw.calibrate import measure_gpu

    spec = Catalog().model("llama3-8b")
    links = {"H200-host": {"bandwidth_gbs": H200_RATES["host_bandwidth"] / 1e9, "efficiency": 1.0,
                           "latency_us": 2000.0, "source": "test"}}
    truth = measure.scaled_rates(gpu_entry(Catalog().gpu("H200"), H200_RATES, 3.0, "H200-host"), 0.8)
    runs = []

    def engine_run(model, run, num_prompts, input_len, output_len, **options):
        runs.append(run)
        result = measure._simulated_run("H200", truth, links, spec, run, (num_prompts, input_len, output_len),
                                        GPU_RUNS)
        return {"elapsed_s": result.elapsed_s, "transitions": len(result.transitions)}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    monkeypatch.setattr(measure_gpu, "cuda_rates", lambda hidden, intermediate, budget: H200_RATES)
    monkeypatch.setattr(measure_gpu, "step_overhead_ms", lambda model, log, device: 3.0)
    monkeypatch.setattr(measure, "run_engine", engine_run)
    lines = []
    profile = measure_gpu.calibrate_cuda(log=lines.append)
    assert runs == ["t1"] * 4 + ["p1-t1"] * 2 and any("NVIDIA H200" in line for line in lines)
    assert list(profile["gpus"]) == ["H200"] and list(profile["links"]) == ["H200-host"]
    catalog = Catalog()
    catalog.add(json.loads(json.dumps(profile)), "calibrated")
    gpu = catalog.gpu("H200")
    assert gpu.matmul_efficiency == pytest.approx(truth["matmul_efficiency"], rel=0.02)
    assert gpu.step_overhead_ms == 3.0 and gpu.row_overhead_us < 1.0
    assert catalog.link("H200-host").latency_us == pytest.approx(2000.0, rel=0.1)
    with pytest.raises(ValueError, match="RTX 4090 is not in the catalogue: give --like"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA GeForce RTX 4090")
        measure_gpu.calibrate_cuda(log=lines.append)
