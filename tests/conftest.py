"""Shared fixtures: tiny random models on disk and the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import TINY_MODELS, make_tiny_model
from seesaw.model.resolve import resolve_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: make_tiny_model(root / name, name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("SEESAW_CACHE_DIR", Path.home() / ".cache" / "seesaw"))


@pytest.fixture(scope="session")
def default_model(cache_dir):
    return resolve_model("default", cache_dir)


