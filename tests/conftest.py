"""Shared fixtures: tiny random models on disk and the default model."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from helpers import TINY_MODELS, make_tiny_model
from seesaw.config import default_cache_dir
from seesaw.model.resolve import resolve_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: make_tiny_model(root / name, name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="session")
def default_model(cache_dir):
    return resolve_model("default", cache_dir)




def _leftovers() -> set[str]:
    """Seesaw worker processes, shared-memory segments and run folders that exist right now."""
    found = {f"shm:{p.name}" for p in Path("/dev/shm").glob("seesaw-*")}
    found |= {f"dir:{p}" for p in Path(tempfile.gettempdir()).glob("seesaw-*")}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"seesaw.worker" in cmdline:
                found.add(f"pid:{proc.name}")
    return found


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test cleans up its processes, sockets and shared memory: anything new fails it."""
    before = _leftovers()
    yield
    deadline = time.monotonic() + 10
    while (new := _leftovers() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not new, f"left behind: {sorted(new)}"
