"""Shared fixtures: tiny random models on disk and the default model."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import TINY_MODELS, default_config, generate, greedy_requests, make_tiny_model, spawned_worker_options
from seesaw.config import default_cache_dir
from seesaw.text import TextCodec
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
    """Seesaw worker processes, shared-memory segments and run folders that exist right now, but
    not those of another live program (a second test run on this machine): each name carries the
    pid of the head that made it, and a worker its head's pid."""
    found = {(f"shm:{p.name}", _pid_in(p.name)) for p in Path("/dev/shm").glob("seesaw-*")}
    found |= {(f"dir:{p}", _pid_in(p.name)) for p in Path(tempfile.gettempdir()).glob("seesaw-*")}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"seesaw.worker" in cmdline.split(b"\0"):
                options = spawned_worker_options(cmdline)
                # One the options do not name a head for (another version's) counts as its parent's.
                head = options.parent_pid if options is not None else _parent(int(proc.name))
                found.add((f"pid:{proc.name}", head))
    return {name for name, head in found if head is None or not _is_anothers(head)}


def _pid_in(name: str) -> int | None:
    """The head's pid in a name like seesaw-kv-1234-ab12cd."""
    parts = name.split("-")
    return int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None


def _is_anothers(pid: int) -> bool:
    """Whether `pid` is a live process that is neither this one nor one it started."""
    while pid > 1:
        if pid == os.getpid():
            return False
        pid = _parent(pid)
        if pid is None:
            return False  # gone: whatever it left is for this run to answer for
    return True


def _parent(pid: int) -> int | None:
    """The parent of a live process; None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test cleans up its processes, sockets and shared memory: anything new fails it."""
    before = _leftovers()
    yield
    deadline = time.monotonic() + 10
    while (new := _leftovers() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not new, f"left behind: {sorted(new)}"


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"seesaw-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


@pytest.fixture
def two_hosts():
    """Namespaces A (10.231.0.1) and B (10.231.0.2) joined by a veth pair, with no default route."""
    if not _can_make_namespaces():
        pytest.skip("needs root and `ip netns`")
    tag = os.getpid() % 100000
    a, b = f"seesaw-a-{tag}", f"seesaw-b-{tag}"
    steps = [
        ["ip", "netns", "add", a], ["ip", "netns", "add", b],
        ["ip", "link", "add", f"ssa{tag}", "type", "veth", "peer", "name", f"ssb{tag}"],
        ["ip", "link", "set", f"ssa{tag}", "netns", a], ["ip", "link", "set", f"ssb{tag}", "netns", b],
        ["ip", "-n", a, "addr", "add", "10.231.0.1/24", "dev", f"ssa{tag}"],
        ["ip", "-n", b, "addr", "add", "10.231.0.2/24", "dev", f"ssb{tag}"],
        *[["ip", "-n", ns, "link", "set", dev, "up"] for ns, dev in ((a, f"ssa{tag}"), (b, f"ssb{tag}"), (a, "lo"), (b, "lo"))],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes the veth pair with it
