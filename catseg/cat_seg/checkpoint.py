"""Reading CAT-Seg and CLIP weights from local files.

* :func:`load_checkpoint` reads a detectron2-style CAT-Seg checkpoint (``model_final.pth``: a dict with
  a ``"model"`` state dict, loaded with ``torch.load(weights_only=True)``) or a bare state dict.
* :func:`load_clip_weights` puts OpenAI CLIP (``ViT-L-14-336px.pt``, TorchScript or not) or open_clip
  weights into the CLIP towers of a CAT-Seg model.

The three spellings of the CLIP attention projections (``attn.in_proj_weight``, ``attn.q_proj_weight``,
``attn.q_proj.weight``) are all accepted; see :mod:`cat_seg.modeling.clip`. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .fileio import atomic_write

logger = logging.getLogger(__name__)

#: Scalars an OpenAI CLIP archive stores next to the weights; they are hyper-parameters, not weights.
_CLIP_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_CLIP_PREFIX = "sem_seg_head.predictor.clip_model."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not a state dict, or not matching the model."""


@dataclass
class LoadResult:
    """Keys the model expected but the file lacked, and keys the file had that the model does not use."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def read_state_dict(path: str | os.PathLike, *, allow_torchscript: bool = False) -> dict[str, Tensor]:
    """Read a state dict from a local file.

    Accepted: ``.safetensors``; ``torch.save`` files holding a state dict, or a dict with the state dict
    under ``"model"`` (detectron2) or ``"state_dict"``; with ``allow_torchscript``, a TorchScript
    archive (OpenAI's CLIP files). A leading ``module.`` (DistributedDataParallel) is removed.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a readable checkpoint or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    elif allow_torchscript and _is_torchscript_archive(path):
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as e:
            raise CheckpointError(f"{path}: not a readable TorchScript archive ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            hint = " (a TorchScript archive? use load_clip_weights for OpenAI CLIP files)"
            hint = hint if zipfile.is_zipfile(path) and _is_torchscript_archive(path) else ""
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint{hint}: {e}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_summarise([str(k) for k in bad])}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _match_wrapped_names(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map ``X.weight`` onto ``X.base_layer.weight`` where the model's layer is wrapped (PEFT)."""
    expected = set(model.state_dict().keys())
    out = {}
    for key, value in state_dict.items():
        if key not in expected and "." in key:
            module, name = key.rsplit(".", 1)
            wrapped = f"{module}.base_layer.{name}"
            if wrapped in expected:
                key = wrapped
        out[key] = value
    return out


def load_state_dict_into(
    model: nn.Module, state_dict: dict[str, Tensor], *, source: str, strict: bool = True
) -> LoadResult:
    """Copy ``state_dict`` into ``model``; errors name ``source``.

    Shape mismatches are always an error. With ``strict``, missing or unexpected keys are an error too;
    otherwise they are returned (and logged).
    """
    state_dict = _match_wrapped_names(state_dict, model)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: does not fit the model: {e}") from None
    loaded = LoadResult(sorted(result.missing_keys), sorted(result.unexpected_keys))
    if strict and (loaded.missing_keys or loaded.unexpected_keys):
        raise CheckpointError(
            f"{source}: {len(loaded.missing_keys)} missing key(s) [{_summarise(loaded.missing_keys)}] and "
            f"{len(loaded.unexpected_keys)} unexpected key(s) [{_summarise(loaded.unexpected_keys)}]"
        )
    if loaded.missing_keys:
        logger.warning(
            "%s: %d missing keys: %s", source, len(loaded.missing_keys), _summarise(loaded.missing_keys)
        )
    if loaded.unexpected_keys:
        logger.warning(
            "%s: %d unexpected keys: %s",
            source,
            len(loaded.unexpected_keys),
            _summarise(loaded.unexpected_keys),
        )
    return loaded


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> LoadResult:
    """Load a CAT-Seg checkpoint (e.g. the released ``model_final.pth``) into ``model``.

    Args:
        model: a :class:`~cat_seg.modeling.CATSeg` (adapters, if any, may already be attached).
        path: ``torch.save`` file with a ``"model"`` state dict or a bare state dict, or ``.safetensors``.
        strict: raise on missing or unexpected keys (shape mismatches always raise).
    Returns:
        the missing and unexpected keys.
    """
    state_dict = read_state_dict(path)
    result = load_state_dict_into(model, state_dict, source=str(path), strict=strict)
    logger.info("loaded %d tensors from %s", len(state_dict), path)
    return result


def load_clip_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> LoadResult:
    """Load OpenAI CLIP or open_clip weights into the CLIP towers of a CAT-Seg model, of another model
    family that exposes its CLIP as ``clip_model`` (SAN), or into a bare CLIP.

    The positional embedding keeps the pre-training grid (it is resized at run time), so e.g. OpenAI's
    ``ViT-B-16.pt`` (224 px) fits the ``vitb_384`` preset as it is.

    Args:
        model: a :class:`~cat_seg.modeling.CATSeg` (``sem_seg_head.predictor.clip_model``), a model with a
            ``clip_model`` (:class:`~cat_seg.modeling.SAN`) or a :class:`~cat_seg.modeling.CLIP`.
        path: OpenAI ``.pt`` (TorchScript or state dict), an open_clip checkpoint (``.pt``/``.bin`` with
            an optional ``"state_dict"`` key) or ``.safetensors``.
        strict: raise on missing or unexpected keys.
    """
    clip = getattr(getattr(getattr(model, "sem_seg_head", None), "predictor", None), "clip_model", None)
    if clip is None:  # another model family's whole CLIP (SAN: ``model.clip_model``), else a bare CLIP
        clip = getattr(model, "clip_model", model)
    state_dict = read_state_dict(path, allow_torchscript=True)
    if any(k.startswith(_CLIP_PREFIX) for k in state_dict):
        state_dict = {k[len(_CLIP_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_CLIP_PREFIX)}
    state_dict = {k: v for k, v in state_dict.items() if k not in _CLIP_METADATA_KEYS and k != "attn_mask"}
    result = load_state_dict_into(clip, state_dict, source=str(path), strict=strict)
    logger.info("loaded CLIP weights from %s", path)
    return result


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: object) -> Path:
    """Write ``{"model": state_dict, **extra}`` atomically (temporary file in the same folder, then rename)."""
    state = {"model": model.state_dict(), **extra}
    return atomic_write(path, lambda f: torch.save(state, f))
