"""The engine's flags are declared once: `batch`, `serve` and `calibrate` take them from
`EngineOptions`, and the values parsed become one `EngineOptions` and then the engine's config."""

from __future__ import annotations

from dataclasses import fields

import typer
import typer.main
from typer.testing import CliRunner

from seesaw.config import EngineConfig, default_token_budget
from seesaw.layout import Layout
from seesaw_cli.engine_options import JOINING, EngineOptions, engine_config, engine_flags
from seesaw_cli.main import app


def _flags(command: str) -> dict[str, tuple]:
    """Each option of a command: its spellings and its default, by parameter name."""
    params = typer.main.get_command(app).commands[command].params
    return {param.name: (tuple(param.opts), tuple(param.secondary_opts), param.default) for param in params}


def test_batch_and_serve_take_the_same_engine_flags_with_the_same_defaults():
    batch, serve = _flags("batch"), _flags("serve")
    declared = {field.name: field.default for field in fields(EngineOptions)}
    for name, default in declared.items():
        assert batch[name][2] == default, name
        if name in JOINING:  # the daemon runs every worker on its own host
            assert name not in serve
        else:
            assert serve[name] == batch[name], name


def test_calibrate_takes_the_model_and_device_flags_with_its_own_default_model():
    calibrate = _flags("calibrate")
    assert calibrate["model"] == (("--model", "-m"), (), "dummy:tiny")
    assert calibrate["device"] == (("--device",), (), "cpu")
    assert "layout" not in calibrate and "max_num_seqs" not in calibrate


def test_the_flags_given_become_one_engine_options():
    seen = []
    probe = typer.Typer()

    @probe.command()
    @engine_flags()
    def run(name: str = "x", options: EngineOptions = EngineOptions()) -> None:
        seen.append((name, options))

    done = CliRunner().invoke(probe, ["--name", "y", "--max-num-seqs", "8", "--no-overlap", "-m", "dummy:tiny",
                                      "--host-buffer-gb", "0.5"])
    assert done.exit_code == 0, done.output
    assert seen == [("y", EngineOptions(model="dummy:tiny", max_num_seqs=8, overlap=False, host_buffer_gb="0.5"))]


def test_default_options_make_the_engines_default_config_with_the_devices_token_budget():
    config = engine_config(EngineOptions(), None)
    expected = EngineConfig()
    assert config.model == expected.model and config.cache == expected.cache and config.parallel == expected.parallel
    assert config.transport == expected.transport
    assert config.scheduler.max_num_batched_tokens == default_token_budget("cpu")


def test_engine_config_takes_every_flag_into_its_slice():
    options = EngineOptions(model="dummy:tiny", dtype="float16", max_model_len=64, seed=7, block_size=8, kv_cache_gb=0.5,
                            memory_fraction=0.5, host_buffer_gb="1.5", threads=2, local_workers=1, head_address="tcp://h:1",
                            max_restarts=1, advertise_address="10.0.0.2", join_timeout=5.0, max_num_batched_tokens=64,
                            max_num_seqs=4, host_low_water=0.3, prefill_min_fill=0.2, prefill_max_wait=1.0, overlap=False)
    config = engine_config(options, (Layout(pp=2), Layout(tp=2)))
    assert (config.model.model, config.model.dtype, config.model.max_model_len, config.model.seed) == (
        "dummy:tiny", "float16", 64, 7)
    assert (config.cache.block_size, config.cache.kv_cache_gb, config.cache.memory_fraction,
            config.cache.host_buffer_gb) == (8, 0.5, 0.5, 1.5)
    assert (config.parallel.layout, config.parallel.decode_layout, config.parallel.threads_per_worker,
            config.parallel.num_local_workers) == (Layout(pp=2), Layout(tp=2), 2, 1)
    assert (config.transport.head_address, config.transport.max_restarts, config.transport.advertise_address,
            config.transport.join_timeout_s) == ("tcp://h:1", 1, "10.0.0.2", 5.0)
    scheduler = config.scheduler
    assert (scheduler.max_num_batched_tokens, scheduler.max_num_seqs, scheduler.host_low_water,
            scheduler.prefill_min_fill, scheduler.prefill_max_wait_s, scheduler.overlap) == (64, 4, 0.3, 0.2, 1.0, False)
