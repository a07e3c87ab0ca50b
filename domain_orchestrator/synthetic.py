"""Random adapters written in the released library format, for tests, benchmarks and demos.

The files are exactly what PEFT's ``save_pretrained`` writes for a LoRA adapter (``adapter_config.json``
with every field of PEFT's ``LoraConfig``, ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A/B.weight`` and ``{"format": "pt"}`` metadata), written by
:func:`cat_seg.lora.write_adapter` without importing ``peft``, plus the SemLA statistics file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cat_seg.lora import PEFT_PREFIX, LoraSpec, peft_adapter_config, write_adapter

from .prototypes import write_statistics


def linear_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the named Linear layers of ``model``."""
    modules = dict(model.named_modules())
    return {n: (modules[n].in_features, modules[n].out_features) for n in names}


def write_random_adapter(
    folder: str | os.PathLike,
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int = 8,
    alpha: float = 16,
    seed: int = 0,
    std: float = 0.02,
    embedding: np.ndarray | None = None,
    use_rslora: bool = False,
) -> Path:
    """Write one adapter with random, non-zero A and B.

    Args:
        folder: ``<library>/<name>``; created.
        shapes: target module -> (in_features, out_features).
        rank, alpha: LoRA rank and alpha (scaling alpha / rank).
        seed: seeds the tensors.
        std: standard deviation of the entries of A and B.
        embedding: (D,) prototype; written as ``<name>_statistics.npz`` when given.
        use_rslora: record rsLoRA scaling (alpha / sqrt(rank)) in the config.
    Returns:
        the folder.
    """
    folder = Path(folder)
    spec = LoraSpec(r=rank, lora_alpha=alpha, target_modules=tuple(shapes), use_rslora=use_rslora)
    config = peft_adapter_config(spec, None)  # no model class to record: auto_mapping null
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * std
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std
    write_adapter(folder, config, tensors)
    if embedding is not None:
        write_statistics(folder, folder.name, embedding)
    return folder
