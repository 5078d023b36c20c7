"""Shared fixtures: the toy base model (built once, cached) and a real local Ray."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="session")
def toy_model() -> str:
    from pipeline.toy_model import ensure_toy_model

    return str(ensure_toy_model(seed=0))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
