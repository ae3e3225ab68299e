"""Shared test setup: Hypothesis profiles, marker-driven skips, a seeded generator."""

from __future__ import annotations

import os

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # only the property tests need it, and they fail to import without it
    settings = None

if settings is not None:
    # CI runs must be reproducible: same examples every run, no example database writes.
    settings.register_profile("ci", derandomize=True, database=None, deadline=None)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    skip_interp = pytest.mark.skip(reason="Triton interpreter test: set TRITON_INTERPRET=1")
    gpu_items = [item for item in items if "gpu" in item.keywords]
    # Only ask about CUDA when a gpu test was collected: the question initialises CUDA.
    has_cuda = bool(gpu_items) and torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "interpreter" in item.keywords and not interpret:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen() -> torch.Generator:
    """CPU generator with a fixed seed, for tests that draw random tensors."""
    return torch.Generator().manual_seed(0)
