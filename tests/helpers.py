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


def write_tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` (32-px ViT, 16-d projection) and its ``CLIPImageProcessor``, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder
