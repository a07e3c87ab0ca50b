"""Shared test helpers (imported as ``helpers``): repository paths, fixture manifests, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CONFIG = REPO_ROOT / "catseg" / "configs" / "tiny" / "tiny.yaml"


def load_fixture(name: str) -> dict:
    with open(FIXTURES / name, encoding="utf-8") as f:
        return json.load(f)


def build_tiny(seed: int = 0, opts: tuple[str, ...] = ()):  # noqa: ANN201
    """A randomly initialised tiny CAT-Seg (19 Cityscapes classes), seeded."""
    from cat_seg.config import load_config
    from cat_seg.modeling import build_model

    torch.manual_seed(seed)
    return build_model(load_config(TINY_CONFIG, list(opts)), "cpu")


def random_inputs(n: int = 2, seed: int = 0, sizes=((50, 70), (41, 33)), num_classes: int = 19):  # noqa: ANN001, ANN201
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        label = torch.randint(0, num_classes, (h, w), generator=g)
        label[:3] = 255
        out.append({"image": image, "sem_seg": label, "height": h, "width": w})
    return out
