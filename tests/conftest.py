"""Shared fixtures: tiny random models on disk and the default model."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from helpers import TINY_MODELS, default_config, generate, greedy_requests, make_tiny_model
from seesaw.config import default_cache_dir
from seesaw.frontend.text import TextCodec
from seesaw.model.resolve import resolve_model

CHATS = [
    "Tell me about the moon.", "What is 12 times 7?", "Name three rivers in Europe.",
    "Write a short poem about rain.", "How do plants make food?", "What is a prime number?",
    "Give me a tip for learning to cook.", "Why do cats purr?", "Explain what a CPU does.",
    "Describe a sunset in one sentence.", "What is the tallest mountain?", "Suggest a name for a dog.",
    "How far away is the sun?", "What does a bee do?", "List two colours of the rainbow.",
    "What is water made of?", "Tell me a fun fact about octopuses.", "How many days are in a leap year?",
    "What is the opposite of cold?", "Say hello in French.",
]


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


@pytest.fixture(scope="session")
def default_prompts(default_model):
    """Twenty short chats, tokenized with the default model's chat template."""
    codec = TextCodec(default_model.tokenizer_folder)
    return [codec.encode_chat([{"role": "user", "content": text}]) for text in CHATS]


@pytest.fixture(scope="session")
def default_t1(default_prompts):
    """The default model's greedy continuations (24 tokens) at t1: what every layout is held to."""
    return [r.token_ids for r in generate(default_config("t1"), greedy_requests(default_prompts, 24))]



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
