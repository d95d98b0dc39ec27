"""What the CUDA test machine has installed (../shared/tools/GPU.md) and what it needs carried, for
bench/gpu_check.sh's rehearsal on a machine without a GPU (tests/test_gpu_check.py,
bench/gpu_check_rehearsal.sh).

    python bench/gpu_machine.py SITE   # link this environment's share of the GPU machine's packages into SITE
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# Installed on the GPU machine, each with its own dependencies.
GPU_MACHINE = ["torch", "cupy-cuda13x", "triton", "transformers", "typer", "uvloop", "safetensors", "tokenizers",
               "numpy", "setuptools"]
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}


def carried() -> set[str]:
    """The wheels gpu_check.sh requires in .whl/, as distribution names."""
    listed = re.search(r"^wheels=\(([^)]*)\)", SCRIPT.read_text(), re.MULTILINE)
    return {canonicalize_name(name) for name in listed.group(1).split()}


def requirements(name: str) -> list[str]:
    """The distributions `name` needs on the GPU machine's Python (no extras)."""
    needed = []
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({**GPU_PYTHON, "extra": ""}):
            needed.append(canonicalize_name(requirement.name))
    return needed


def closure(names: list[str]) -> set[str]:
    """`names` and everything they need, as far as this environment's metadata tells."""
    seen, queue = set(), [canonicalize_name(name) for name in names]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            queue.extend(requirements(name))
        except metadata.PackageNotFoundError:
            continue  # cupy: not on a machine without a GPU, and nothing the run needs depends on it
    return seen


def link_machine_site(target: Path) -> int:
    """Symlink into `target` the top-level entries of every installed distribution the GPU machine
    has (GPU_MACHINE and their dependencies), and nothing else; returns how many."""
    machine = closure(GPU_MACHINE)
    target.mkdir(parents=True, exist_ok=True)
    linked = set()
    for distribution in metadata.distributions():
        if canonicalize_name(distribution.metadata["Name"]) not in machine:
            continue
        for file in distribution.files or []:
            top = file.parts[0]
            source = Path(distribution.locate_file(top))
            if top not in linked and top != ".." and source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)
                linked.add(top)
    return len(linked)


if __name__ == "__main__":
    print(f"{link_machine_site(Path(sys.argv[1]))} entries of the GPU machine's packages linked")
