"""Checks on the released files, for users who have them (skipped unless SEMLA_WEIGHTS_DIR is set).

    SEMLA_WEIGHTS_DIR=/path/to/dir uv run pytest tests/test_real_weights.py

where the folder holds ``model_final.pth`` (CAT-Seg (L), the upstream ``model_large.pth`` renamed) and/or
``loradb/`` (the released SemLA adapters, with or without their statistics files).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cat_seg.checkpoint import load_checkpoint
from cat_seg.config import CATSEG_ROOT, load_config
from cat_seg.modeling import build_model
from domain_orchestrator.library import AdapterLibrary

pytestmark = pytest.mark.weights


def _weights_dir() -> Path:
    return Path(os.environ.get("SEMLA_WEIGHTS_DIR", "/nonexistent"))


@pytest.fixture(scope="module")
def vitl():  # noqa: ANN201
    cfg = load_config(CATSEG_ROOT / "configs" / "acdc" / "rain" / "lora-rain-acdc.yaml")
    return build_model(cfg, "cpu").eval()


def test_released_catseg_checkpoint_loads_without_missing_or_unexpected_keys(vitl) -> None:  # noqa: ANN001
    path = _weights_dir() / "model_final.pth"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    result = load_checkpoint(vitl, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        out = vitl([{"image": torch.zeros(3, 64, 96, dtype=torch.uint8)}])[0]["sem_seg"]
    assert out.shape == (19, 64, 96) and torch.isfinite(out).all()


def test_released_adapters_validate_against_the_model(vitl) -> None:  # noqa: ANN001
    root = _weights_dir() / "loradb"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    names = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    library = AdapterLibrary.open(root, names, model=vitl)
    assert len(library) == len(names) > 0
    assert len(library.layers) == 214
    if all((root / n / f"{n}_statistics.npz").is_file() for n in names):
        from domain_orchestrator.prototypes import load_prototypes

        found = load_prototypes(root, names)
        assert found.problems == [] and found.vectors.shape[0] == len(names)
