"""Pytest configuration: markers and shared fixtures (helpers live in ``helpers.py``)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import build_tiny


@pytest.fixture
def tiny_model():  # noqa: ANN201
    return build_tiny()


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Skip ``gpu`` tests without CUDA and ``weights`` tests unless real weights are provided."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_weights = pytest.mark.skip(reason="needs real weights (set SEMLA_WEIGHTS_DIR)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "weights" in item.keywords and not os.environ.get("SEMLA_WEIGHTS_DIR"):
            item.add_marker(skip_weights)


@pytest.fixture(autouse=True)
def _no_domain_specs_left_behind():  # noqa: ANN202
    """Each test starts and ends without domains of your own registered (they are per-process state)."""
    from cat_seg.data.registry import unregister_domain_specs

    unregister_domain_specs()
    yield
    unregister_domain_specs()
