"""Shared fixtures of the data tests: synthetic roots written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cat_seg.data.synthetic import WRITERS, write_synthetic

NUM_IMAGES = 3
SEED = 7


@pytest.fixture(scope="session")
def num_images() -> int:
    """Images per split (and per condition) in ``synthetic_root``."""
    return NUM_IMAGES


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding every layout (3 images per split and condition), written once. Do not modify."""
    root = tmp_path_factory.mktemp("synthetic_all")
    for layout in WRITERS:
        write_synthetic(layout, root, NUM_IMAGES, SEED)
    return root


@pytest.fixture
def fresh_root(tmp_path: Path):
    """Factory: ``fresh_root(layout, **kw)`` writes one layout into a new tmp root (safe to modify)."""

    def make(layout: str, num_images: int = NUM_IMAGES, seed: int = SEED, **kwargs: object) -> Path:
        root = tmp_path / f"{layout}_{seed}"
        write_synthetic(layout, root, num_images, seed, **kwargs)
        return root

    return make
