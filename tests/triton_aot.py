"""Compile every Triton kernel variant a GPU worker launches, ahead of time for GPUs that are not
here: run as `python tests/triton_aot.py 90 80 89` (without TRITON_INTERPRET). The variants are
those a worker compiles while loading (its warm-up), for dummy:llama3-8b's shards at t1 and t2 in
bf16; each is bound as Triton binds a launch and compiled for each architecture, and one JSON
line per compile says its shared memory, registers and spilled bytes (from the cubin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from seesaw.layout import Layout, shard_for
from seesaw.model.presets import PRESETS
from seesaw.model.spec import ModelSpec
from seesaw.runtime.worker_runtime import _warm_up_triton


def warm_up_launches() -> list[tuple[JITFunction, tuple, dict]]:
    """Every distinct launch of a worker's warm-up, recorded instead of launched (CPU tensors)."""
    launches, seen = [], set()

    def record(kernel, *args, grid, warmup, **kwargs):
        key = (kernel.fn.__name__, repr(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            launches.append((kernel, args, kwargs))

    JITFunction.run = record  # this process only compiles: nothing is launched
    spec = ModelSpec.from_hf_config(dict(PRESETS["llama3-8b"]))
    shards = [shard_for(Layout.parse(text), spec.shape, 0) for text in ("t1", "t2")]
    _warm_up_triton(shards, spec, 16, torch.bfloat16, torch.device("cpu"))
    return launches


def compile_for(kernel: JITFunction, args: tuple, kwargs: dict, arch: int) -> dict:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    return {"kernel": kernel.fn.__name__, "arch": arch, "variant": {k: v for k, v in kwargs.items() if k.isupper()},
            "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps, **usage}


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local (spilled) bytes, as cuobjdump reads them from the cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(part.split(":", 1) for part in text.split() if part.split(":", 1)[0] in ("REG", "STACK", "LOCAL"))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "local_bytes": int(fields["LOCAL"])}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the interpreter compiles nothing")
    launches = warm_up_launches()
    for arch in map(int, sys.argv[1:]):
        for kernel, args, kwargs in launches:
            print(json.dumps(compile_for(kernel, args, kwargs, arch)), flush=True)
