"""CAT-Seg in plain PyTorch: CLIP towers, cost aggregation, the meta-architecture and presets."""

from .aggregator import Aggregator
from .build import MODEL_PRESETS, ModelPreset, build_catseg, build_model, preset_for
from .cat_seg import CATSeg, CATSegHead, CATSegPredictor, sem_seg_postprocess
from .clip import CLIP, CLIPConfig

__all__ = [
    "CLIP",
    "MODEL_PRESETS",
    "Aggregator",
    "CATSeg",
    "CATSegHead",
    "CATSegPredictor",
    "CLIPConfig",
    "ModelPreset",
    "build_catseg",
    "build_model",
    "preset_for",
    "sem_seg_postprocess",
]
