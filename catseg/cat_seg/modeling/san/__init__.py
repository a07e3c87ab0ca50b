"""SAN (Side Adapter Network), the second model family, registered as ``MODEL.META_ARCHITECTURE: "SAN"``.

Importing :mod:`cat_seg.modeling` registers it. Configs: ``catseg/configs/san/``; parity with the original
code: ``tools/san_parity/``.
"""

from ..registry import register_model
from .model import SAN, build_san, build_san_model, san_kwargs_from_cfg

register_model("SAN", architecture=san_kwargs_from_cfg)(build_san_model)

__all__ = ["SAN", "build_san", "build_san_model", "san_kwargs_from_cfg"]
