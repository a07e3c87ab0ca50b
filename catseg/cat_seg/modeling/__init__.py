"""CAT-Seg in plain PyTorch: CLIP towers, cost aggregation, the meta-architecture and presets.

Models are built with :func:`build_model`, which dispatches on ``MODEL.META_ARCHITECTURE`` through the
model registry (:mod:`.registry`); :class:`SegmentationModel` (:mod:`.interface`) is what the rest of the
code uses from a built model.
"""

from .aggregator import Aggregator
from .build import MODEL_PRESETS, ModelPreset, build_catseg, preset_for
from .cat_seg import CATSeg, CATSegHead, CATSegPredictor, sem_seg_postprocess
from .clip import CLIP, CLIPConfig
from .interface import SegmentationModel
from .registry import MODEL_REGISTRY, build_model, register_model, unregister_model
from .san import SAN  # registers "SAN"

__all__ = [
    "CLIP",
    "MODEL_PRESETS",
    "MODEL_REGISTRY",
    "Aggregator",
    "CATSeg",
    "CATSegHead",
    "CATSegPredictor",
    "CLIPConfig",
    "SAN",
    "ModelPreset",
    "SegmentationModel",
    "build_catseg",
    "build_model",
    "preset_for",
    "register_model",
    "sem_seg_postprocess",
    "unregister_model",
]
