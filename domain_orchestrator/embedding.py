"""Image embeddings for domain retrieval: image files in, one vector per image out.

SemLA scores a test image against each library domain's prototype (the mean embedding of the domain's
training images) and fuses the adapters of the closest domains. Both the prototypes and the query are
embeddings of the **original image files** (not the resized images the segmentation model sees), made by
an :class:`ImageEmbedder`. :func:`load_embedder` builds one from a local spec; nothing is downloaded:

* a folder holding a Hugging Face ``CLIPModel`` saved with ``save_pretrained`` (the original code uses
  ``openai/clip-vit-large-patch14``): ``CLIPProcessor``'s preprocessing (transformers 4.x, the slow
  PIL-based ``CLIPImageProcessor``) re-implemented here, then ``get_image_features``: the projected,
  unnormalised CLS feature;
* an open_clip model, ``open_clip:<model name>:<checkpoint file>`` or a folder with
  ``open_clip_config.json`` (open_clip's ``local-dir:`` format): open_clip's own eval transform, then
  ``encode_image`` (unnormalised);
* ``catseg``: the image tower of the CAT-Seg model being evaluated, with its base weights: the projected
  CLS feature of ``clip_model.visual`` (non-dense forward) at the model's CLIP resolution.

Every embedder converts an image to RGB with PIL on reading (``Image.open(path).convert("RGB")``, as the
original code does: transparency is dropped, not composited; no EXIF rotation), so the same file gives
the same vector whichever way it comes in.

Each embedder has an :attr:`~ImageEmbedder.identity`: a small JSON-serialisable dict
``{"kind", "name", "dim", "digest"}`` with ``digest`` the SHA-256 of everything that determines the
embedding (the architecture hyper-parameters, the preprocessing, and the bytes of every tensor of the
image tower; never a path). Two embedders give the same vectors iff their identities are equal, so
statistics can record which embedder made them.

``transformers`` and ``open_clip`` are imported only by the loaders that need them.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cat_seg.progress import progress as report_progress

if TYPE_CHECKING:
    from cat_seg.modeling import CATSeg

logger = logging.getLogger(__name__)

__all__ = [
    "CATSegEmbedder",
    "ClipPreprocess",
    "EmbeddingError",
    "HFCLIPEmbedder",
    "ImageEmbedder",
    "OpenCLIPEmbedder",
    "center_crop_or_pad",
    "load_embedder",
    "load_image",
    "shortest_edge_size",
    "tensor_digest",
]

#: OpenAI CLIP normalisation (0-1 units), the default of ``CLIPImageProcessor``.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_CONFIG = "config.json"
HF_PREPROCESSOR_CONFIG = "preprocessor_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
CATSEG_SPEC = "catseg"
OPEN_CLIP_PREFIX = "open_clip:"
LOCAL_DIR_PREFIX = "local-dir:"

SPEC_FORMS = (
    "'catseg' (the CAT-Seg model's own image tower); "
    "a folder holding a Hugging Face CLIPModel (config.json with model_type 'clip', weights, "
    "optionally preprocessor_config.json); "
    "'open_clip:<model name>:<checkpoint file>'; "
    f"a folder holding {OPEN_CLIP_CONFIG} and weights (also written 'local-dir:<folder>')"
)

# Image processor classes whose preprocessing ClipPreprocess reproduces.
_CLIP_PROCESSOR_TYPES = {
    "CLIPImageProcessor",
    "CLIPImageProcessorFast",
    "CLIPImageProcessorPil",
    "CLIPFeatureExtractor",
}


class EmbeddingError(ValueError):
    """A bad embedding-model spec, folder or file, or an unreadable image; the message names the path."""


# --------------------------------------------------------------------------------------------------
# Images and preprocessing (pure)
# --------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB, as the original code does (``Image.open(path).convert("RGB")``).

    Raises:
        EmbeddingError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes the whole file, so truncation is found here
    except FileNotFoundError:
        raise EmbeddingError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for non-images and OSError for truncated files.
        raise EmbeddingError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) of resizing the shorter side to ``size``, keeping the aspect ratio.

    Hugging Face's rule (``get_resize_output_image_size(..., default_to_square=False)``, itself torchvision's):
    the long side becomes ``int(size * long / short)``, truncated.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_or_pad(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of an (H, W, C) array to (height, width), zero-padding a side that is too short.

    Offsets are Hugging Face's ``center_crop``: ``top = (H - height) // 2``, ``left = (W - width) // 2``;
    when the image is smaller than the crop it is first centred on a zero canvas of
    ``max(H, height) x max(W, width)`` at offset ``ceil((new - old) / 2)``.

    Args:
        array: (H, W, C) image.
        height, width: crop size.
    Returns:
        (height, width, C), same dtype.
    """
    orig_h, orig_w = array.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:  # fits: a plain crop
        return array[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    canvas = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    pad_top, pad_left = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    canvas[pad_top : pad_top + orig_h, pad_left : pad_left + orig_w] = array
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


@dataclass(frozen=True)
class ClipPreprocess:
    """The arithmetic of transformers' slow ``CLIPImageProcessor``, on a PIL RGB image.

    In order: resize with PIL (``resize`` an int: the shorter side to it, :func:`shortest_edge_size`; a
    (height, width) pair: to that size; None: no resize), centre crop (:func:`center_crop_or_pad`; None:
    none), ``x = float32(float64(pixels) * rescale)`` (None: ``float32(pixels)``, i.e. 0-255 units), then
    ``(x - mean) / std`` in float32 (None: no normalisation). This is also CAT-Seg's CLIP input
    preprocessing with ``rescale=None`` and the mean and std in 0-255 units.

    Picklable, so DataLoader workers can run it.
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    resample: int = int(Image.Resampling.BICUBIC)
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD

    def __call__(self, image: Image.Image) -> Tensor:
        """PIL image -> (3, S_h, S_w) float32 tensor."""
        image = _to_rgb(image)
        if self.resize is not None:
            if isinstance(self.resize, int):
                size = shortest_edge_size(image.height, image.width, self.resize)
            else:
                size = tuple(self.resize)
            # PIL takes (width, height); reducing_gap=None is HF's call (and PIL's default).
            image = image.resize(
                (size[1], size[0]), resample=Image.Resampling(self.resample), reducing_gap=None
            )
        array = np.asarray(image)  # (H, W, 3) uint8
        if self.crop is not None:
            array = center_crop_or_pad(array, *self.crop)
        if self.rescale is None:
            x = array.astype(np.float32)
        else:  # HF rescales in float64, then casts to float32
            x = (array.astype(np.float64) * self.rescale).astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image."""
        if self.crop is not None:
            return tuple(self.crop)
        if self.resize is not None and not isinstance(self.resize, int):
            return tuple(self.resize)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (part of the embedder's identity)."""
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(meta: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """SHA-256 over a JSON description and named tensors (name, dtype, shape and bytes, sorted by name).

    Args:
        meta: JSON-serialisable facts that also determine the result (architecture, preprocessing).
        tensors: name -> tensor, on any device.
    Returns:
        64 hex characters.
    """
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _module_tensors(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Parameters and buffers of a module (each shared tensor once)."""
    out = {f"{prefix}{n}": p for n, p in module.named_parameters()}
    out.update({f"{prefix}{n}": b for n, b in module.named_buffers()})
    return out


def _version_key(tensors: dict[str, Tensor]) -> tuple | None:
    """Changes whenever a tensor is modified in place or replaced; None if it cannot be tracked
    (inference-mode tensors keep no version counter)."""
    try:
        return tuple((name, t.data_ptr(), t._version) for name, t in sorted(tensors.items()))
    except RuntimeError:
        return None


def _vit_name(patch: int, resolution: int, width: int, layers: int) -> str:
    return f"vit-p{patch}-{resolution}-w{width}-l{layers}"


# --------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses image files; a failure is returned as a message, raised by the caller."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable[[Image.Image], Tensor]):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return index, self.transform(load_image(path)), None
        except EmbeddingError as e:
            return index, None, str(e)
        except Exception as e:  # noqa: BLE001 - any preprocessing failure must name the file
            return index, None, f"{path}: cannot preprocess the image ({type(e).__name__}: {e})"


def _collate(
    items: list[tuple[int, Tensor | None, str | None]],
) -> tuple[list[int], Tensor | None, list[str]]:
    errors = [message for _, _, message in items if message is not None]
    if errors:
        return [i for i, _, _ in items], None, errors
    return [i for i, _, _ in items], torch.stack([pixels for _, pixels, _ in items]), []


class ImageEmbedder(abc.ABC):
    """Turns images into (D,) float32 vectors; the base class of the three embedders.

    Subclasses implement :meth:`_encode` (normalised pixels on the device -> (B, D)) and
    :meth:`_identity_parts` (what the identity digest covers).

    Attributes:
        kind: ``hf_clip``, ``open_clip`` or ``catseg``.
        name: a short architecture name (content-derived, never a path).
        dim: D.
        device: where the forward pass runs.
        transform: the picklable PIL -> (3, S_h, S_w) preprocessing.
        input_size: (S_h, S_w).
        source: where the model came from (for logs; not part of the identity).
    """

    kind: str = ""

    def __init__(
        self,
        *,
        name: str,
        dim: int,
        transform: Callable[[Image.Image], Tensor],
        input_size: tuple[int, int],
        source: str,
    ) -> None:
        self.name = name
        self.dim = int(dim)
        self.transform = transform
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.source = source
        self._identity_cache: tuple[tuple, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, input={self.input_size}, "
            f"device={self.device}, source={self.source!r})"
        )

    # -- to implement ----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the forward pass runs: the model's device (pixels are moved there)."""

    @abc.abstractmethod
    def _encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, S_h, S_w) float32 pixels on :attr:`device` -> (B, D) embeddings (any float dtype)."""

    @abc.abstractmethod
    def _identity_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(architecture and preprocessing facts, the tensors that determine the embedding)."""

    # -- identity --------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        """``{"kind", "name", "dim", "digest"}``: equal for two embedders iff they give the same vectors.

        ``digest`` is :func:`tensor_digest` of the architecture, the preprocessing and every tensor of the
        image tower. Computed on first use (about 1 s per GB of weights) and recomputed only when a tensor
        was modified in place or replaced since.
        """
        meta, tensors = self._identity_parts()
        key = _version_key(tensors)
        if key is None or self._identity_cache is None or self._identity_cache[0] != key:
            meta = {"kind": self.kind, "name": self.name, "dim": self.dim, **meta}
            identity = {"kind": self.kind, "name": self.name, "dim": self.dim}
            identity["digest"] = tensor_digest(meta, tensors)
            self._identity_cache = (key, identity)
        return dict(self._identity_cache[1])

    # -- images ----------------------------------------------------------------------------------
    def load_image(self, path: str | os.PathLike) -> Image.Image:
        """The image file as RGB (see :func:`load_image`)."""
        return load_image(path)

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image (converted to RGB first) -> (3, S_h, S_w) float32, the model's input."""
        return self.transform(_to_rgb(image))

    # -- embedding -------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_batch(self, pixels: Tensor) -> Tensor:
        """Embed preprocessed images.

        Args:
            pixels: (B, 3, S_h, S_w) from :meth:`preprocess`, on any device.
        Returns:
            (B, D) float32 on the CPU.
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, *self.input_size):
            raise ValueError(
                f"expected pixels of shape (B, 3, {self.input_size[0]}, {self.input_size[1]}), "
                f"got {tuple(pixels.shape)}"
            )
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.dim)
        pixels = pixels.to(self.device, dtype=torch.float32, non_blocking=True)
        return self._encode(pixels).float().cpu()

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Embed PIL images in one batch: (B, D) float32 on the CPU."""
        if not images:
            return torch.zeros(0, self.dim)
        return self.embed_batch(torch.stack([self.preprocess(im) for im in images]))

    def embed_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        desc: str = "embedding",
    ) -> np.ndarray:
        """Embed image files, decoding them in a DataLoader while the model runs.

        Args:
            paths: image files; every one must be readable (none is skipped).
            batch_size: images per forward pass.
            num_workers: DataLoader worker processes decoding images (0 = in this process).
            progress: show progress (a bar on a terminal, else a log line every 30 s).
            desc: its label.
        Returns:
            (N, D) float32, row i the embedding of ``paths[i]``.
        Raises:
            EmbeddingError: naming the first file (in order of its batch) that cannot be read.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        paths = list(paths)
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        if not paths:
            return out
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self.transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        batches = report_progress(
            loader,
            total=len(paths),
            desc=desc,
            unit="img",
            enabled=progress,
            log=logger,
            weight=lambda b: len(b[0]),
        )
        for indices, pixels, errors in batches:
            if errors:
                raise EmbeddingError(errors[0])
            out[indices] = self.embed_batch(pixels).numpy()
        return out


class HFCLIPEmbedder(ImageEmbedder):
    """A Hugging Face ``CLIPModel``: ``get_image_features`` (projected, unnormalised) after
    ``CLIPProcessor``'s preprocessing (:class:`ClipPreprocess`). Build with :meth:`from_folder`."""

    kind = "hf_clip"

    def __init__(self, model: nn.Module, transform: ClipPreprocess, *, source: str) -> None:
        vision = model.config.vision_config
        super().__init__(
            name=_vit_name(
                vision.patch_size, vision.image_size, vision.hidden_size, vision.num_hidden_layers
            ),
            dim=model.config.projection_dim,
            transform=transform,
            input_size=transform.output_size,
            source=source,
        )
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> HFCLIPEmbedder:
        """Load ``CLIPModel.from_pretrained(folder, local_files_only=True)`` in float32 (as transformers 4.x
        did by default) and its preprocessing (``preprocessor_config.json``, else the OpenAI defaults)."""
        folder = Path(folder)
        config = _read_json(folder / HF_CONFIG)
        if config.get("model_type") != "clip":
            raise EmbeddingError(
                f"{folder / HF_CONFIG}: model_type is {config.get('model_type')!r}, not 'clip' "
                "(a Hugging Face CLIPModel folder is expected)"
            )
        vision = config.get("vision_config") or {}
        image_size = int(vision.get("image_size", 224))
        transform = _hf_preprocess(folder)
        if transform.output_size != (image_size, image_size):
            raise EmbeddingError(
                f"{folder}: the preprocessing gives {transform.output_size} images but the model takes "
                f"{image_size}x{image_size} (check crop_size in {HF_PREPROCESSOR_CONFIG})"
            )
        from transformers import CLIPModel

        try:
            model, info = CLIPModel.from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
        except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot load"
            raise EmbeddingError(
                f"{folder}: cannot load a Hugging Face CLIPModel ({type(e).__name__}: {e})"
            ) from None
        missing = sorted(
            k for k in info.get("missing_keys", ()) if k.startswith(("vision_model.", "visual_projection."))
        )
        if missing:
            raise EmbeddingError(
                f"{folder}: the weights lack {len(missing)} image-tower tensors (e.g. {missing[:3]}); "
                "they would be random"
            )
        model = model.to(device).eval()
        embedder = cls(model, transform, source=str(folder))
        logger.info(
            "image embedder: Hugging Face CLIPModel from %s (%s, D=%d)", folder, embedder.name, embedder.dim
        )
        return embedder

    def _encode(self, pixels: Tensor) -> Tensor:
        out = self.model.get_image_features(pixel_values=pixels)
        # transformers 4.x returns the projected features; 5.x an output whose pooler_output holds them.
        return out if isinstance(out, Tensor) else out.pooler_output

    def _identity_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        vision = self.model.config.vision_config
        keys = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
        )
        architecture = {k: getattr(vision, k, None) for k in keys}
        architecture["projection_dim"] = self.model.config.projection_dim
        tensors = _module_tensors(self.model.vision_model, "vision_model.")
        tensors.update(_module_tensors(self.model.visual_projection, "visual_projection."))
        return {"architecture": architecture, "preprocess": self.transform.to_dict()}, tensors


class OpenCLIPEmbedder(ImageEmbedder):
    """An open_clip model: ``encode_image`` (unnormalised) after open_clip's eval transform."""

    kind = "open_clip"

    def __init__(
        self, model: nn.Module, transform: Callable, *, model_cfg: dict[str, Any], name: str, source: str
    ) -> None:
        size = model.visual.preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        super().__init__(
            name=name,
            dim=int(model_cfg["embed_dim"]),
            transform=transform,
            input_size=size,
            source=source,
        )
        self.model = model
        self.model_cfg = model_cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.visual.parameters()).device

    @classmethod
    def from_checkpoint(
        cls, model_name: str, checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> OpenCLIPEmbedder:
        """``open_clip.create_model_and_transforms(model_name, pretrained=<checkpoint file>)``."""
        import open_clip

        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise EmbeddingError(f"open_clip checkpoint file not found: {checkpoint}")
        model_name = model_name.replace("/", "-")  # "ViT-B/16" is open_clip's "ViT-B-16"
        # A schema prefix would make open_clip read (or download) the model elsewhere: refuse it first.
        schema = ":" in model_name
        model_cfg = None if schema else open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise EmbeddingError(
                f"open_clip does not know a model named {model_name!r} (see open_clip.list_models())"
            )
        # An absolute path is never mistaken for one of open_clip's pretrained tags (which download).
        return cls._create(
            model_name, str(checkpoint.resolve()), model_cfg, source=str(checkpoint), device=device
        )

    @classmethod
    def from_local_dir(
        cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> OpenCLIPEmbedder:
        """``open_clip.create_model_and_transforms("local-dir:<folder>")``: the folder's
        ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``) and weights."""
        folder = Path(folder)
        config = _read_json(folder / OPEN_CLIP_CONFIG)
        model_cfg = config.get("model_cfg")
        if not isinstance(model_cfg, dict):
            raise EmbeddingError(f"{folder / OPEN_CLIP_CONFIG}: no 'model_cfg' object")
        return cls._create(f"{LOCAL_DIR_PREFIX}{folder}", None, model_cfg, source=str(folder), device=device)

    @classmethod
    def _create(
        cls,
        model_name: str,
        pretrained: str | None,
        model_cfg: dict[str, Any],
        *,
        source: str,
        device: str | torch.device,
    ) -> OpenCLIPEmbedder:
        import open_clip

        text_cfg = model_cfg.get("text_cfg") or {}
        if "hf_model_name" in text_cfg:
            raise EmbeddingError(
                f"{source}: this open_clip model's text tower is the Hugging Face model "
                f"{text_cfg['hf_model_name']!r}, which open_clip would look up on the hub; not supported"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                precision="fp32",
                device=device,
                require_pretrained=True,
                pretrained_image=False,
                weights_only=True,
            )
        except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError/KeyError
            raise EmbeddingError(
                f"{source}: cannot load the open_clip model ({type(e).__name__}: {e})"
            ) from None
        model.eval()
        embedder = cls(model, preprocess, model_cfg=model_cfg, name=_open_clip_name(model_cfg), source=source)
        logger.info("image embedder: open_clip %s from %s (D=%d)", embedder.name, source, embedder.dim)
        return embedder

    def _encode(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _identity_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        meta = {"model_cfg": self.model_cfg, "preprocess": dict(self.model.visual.preprocess_cfg)}
        return json.loads(json.dumps(meta)), _module_tensors(self.model.visual, "visual.")


class CATSegEmbedder(ImageEmbedder):
    """The CAT-Seg model's own CLIP image tower: the projected CLS feature of ``clip_model.visual``
    (non-dense forward) at ``clip_resolution``, with the model's base weights.

    Preprocessing (:class:`ClipPreprocess`): the shorter side to the resolution (PIL bicubic), centre crop,
    pixels in 0-255 normalised with the model's ``clip_pixel_mean`` / ``clip_pixel_std``. The model is not
    modified: the image tower is put in eval mode for the forward pass and every module's mode restored.
    Call it outside any ``fused_adapters`` block and on a model without PEFT layers in its image tower
    (both are errors), so that the vector depends on the base weights only.
    """

    kind = "catseg"

    def __init__(self, model: CATSeg) -> None:
        visual = model.clip_model.visual
        resolution = int(model.clip_resolution)
        transform = ClipPreprocess(
            resize=resolution,
            crop=(resolution, resolution),
            rescale=None,
            mean=tuple(float(v) for v in model.clip_pixel_mean.flatten().tolist()),
            std=tuple(float(v) for v in model.clip_pixel_std.flatten().tolist()),
        )
        super().__init__(
            name=_vit_name(
                visual.patch_size, resolution, visual.transformer.width, len(visual.transformer.resblocks)
            ),
            dim=visual.output_dim,
            transform=transform,
            input_size=(resolution, resolution),
            source=CATSEG_SPEC,
        )
        self.model = model

    @property
    def device(self) -> torch.device:
        """The CAT-Seg model's current device (the embedder never moves the model)."""
        return self.model.clip_model.visual.proj.device

    def _check_base_weights(self) -> None:
        for name, module in self.model.clip_model.visual.named_modules():
            if "forward" in vars(module):
                raise RuntimeError(
                    f"catseg embedding inside a fused_adapters block (visual.{name} is patched): the "
                    "embedding is defined on the base weights; embed before entering the block"
                )
            if hasattr(module, "base_layer"):
                raise RuntimeError(
                    f"catseg embedding: visual.{name} is wrapped by PEFT; the embedding is defined on the "
                    "base weights; embed with the unwrapped model (or use the fused forward for adapters)"
                )

    def _encode(self, pixels: Tensor) -> Tensor:
        self._check_base_weights()
        visual = self.model.clip_model.visual
        modes = [(m, m.training) for m in visual.modules()]
        try:
            visual.eval()
            return visual(pixels.to(self.model.clip_model.dtype), dense=False)
        finally:
            for module, training in modes:
                module.training = training

    def _identity_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        visual = self.model.clip_model.visual
        architecture = {
            "image_size": visual.image_size,
            "patch_size": visual.patch_size,
            "width": visual.transformer.width,
            "layers": len(visual.transformer.resblocks),
            "heads": visual.transformer.resblocks[0].attn.num_heads,
            "output_dim": visual.output_dim,
            "resolution": self.input_size[0],
            "forward": "cls",
        }
        meta = {"architecture": architecture, "preprocess": self.transform.to_dict()}
        return meta, _module_tensors(visual, "visual.")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbeddingError(f"missing {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmbeddingError(f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} must hold a JSON object")
    return data


def _hf_size(value: Any, key: str, path: Path, *, shortest: bool) -> int | tuple[int, int]:
    """A size of a preprocessor config: ``{"shortest_edge": s}``, ``{"height", "width"}`` or a legacy int
    (``size: 224`` means the shortest edge, ``crop_size: 224`` a square)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if shortest else (value, value)
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"} and shortest:
            return int(value["shortest_edge"])
        if set(value) == {"height", "width"}:
            return int(value["height"]), int(value["width"])
    raise EmbeddingError(
        f"{path}: unsupported {key} {value!r} (CLIP's processor uses shortest_edge / height+width)"
    )


def _hf_preprocess(folder: Path) -> ClipPreprocess:
    """:class:`ClipPreprocess` from ``preprocessor_config.json`` (absent: the OpenAI CLIP defaults)."""
    path = folder / HF_PREPROCESSOR_CONFIG
    if not path.is_file():
        logger.info(
            "%s: no %s; using the OpenAI CLIP preprocessing (224, bicubic)", folder, HF_PREPROCESSOR_CONFIG
        )
        return ClipPreprocess(resize=224, crop=(224, 224))
    cfg = _read_json(path)
    kind = cfg.get("image_processor_type", cfg.get("feature_extractor_type"))
    if kind is not None and kind not in _CLIP_PROCESSOR_TYPES:
        raise EmbeddingError(f"{path}: image processor {kind!r} is not CLIP's; not supported")
    if cfg.get("do_pad"):
        raise EmbeddingError(f"{path}: do_pad is not part of CLIP's preprocessing; not supported")
    resample = int(cfg.get("resample", int(Image.Resampling.BICUBIC)))
    if resample not in {int(r) for r in Image.Resampling}:
        raise EmbeddingError(f"{path}: unknown resample {resample!r}")
    mean = cfg.get("image_mean", OPENAI_CLIP_MEAN)
    std = cfg.get("image_std", OPENAI_CLIP_STD)
    mean = tuple(float(v) for v in (mean if isinstance(mean, list) else [mean] * 3))
    std = tuple(float(v) for v in (std if isinstance(std, list) else [std] * 3))
    return ClipPreprocess(
        resize=_hf_size(cfg.get("size", 224), "size", path, shortest=True)
        if cfg.get("do_resize", True)
        else None,
        crop=_hf_size(cfg.get("crop_size", 224), "crop_size", path, shortest=False)
        if cfg.get("do_center_crop", True)
        else None,
        resample=resample,
        rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
        mean=mean if cfg.get("do_normalize", True) else None,
        std=std if cfg.get("do_normalize", True) else None,
    )


def _open_clip_name(model_cfg: dict[str, Any]) -> str:
    """The first open_clip model name whose built-in config is ``model_cfg``, else ``custom``."""
    import open_clip

    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    return "custom"


def load_embedder(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    catseg_model: CATSeg | None = None,
) -> ImageEmbedder:
    """Build the image embedder named by ``spec`` (the CLIs' ``--embedding_model``), from local files only.

    Args:
        spec: ``catseg``; a Hugging Face ``CLIPModel`` folder; ``open_clip:<model name>:<checkpoint file>``
            (split on the first two colons, so the path may hold colons); a folder with
            ``open_clip_config.json`` (or ``local-dir:<folder>``). A folder holding both a CLIP
            ``config.json`` and ``open_clip_config.json`` is read as Hugging Face; write ``local-dir:``
            to read it with open_clip.
        device: where the model runs. For ``catseg`` it must be the CAT-Seg model's device (the model is
            not moved).
        catseg_model: the CAT-Seg model, required for ``catseg``.
    Raises:
        EmbeddingError: a bad spec, a missing path, or files that do not hold such a model.
    """
    text = os.fspath(spec)
    if text == CATSEG_SPEC:
        if catseg_model is None:
            raise EmbeddingError("--embedding_model catseg needs the CAT-Seg model (catseg_model=...)")
        embedder = CATSegEmbedder(catseg_model)
        wanted = torch.device(device)
        if wanted.type != embedder.device.type or (wanted.index is not None and wanted != embedder.device):
            raise EmbeddingError(
                f"catseg embedding: the CAT-Seg model is on {embedder.device}, not {wanted}; "
                f"pass device={str(embedder.device)!r}"
            )
        logger.info("image embedder: the CAT-Seg image tower (%s, D=%d)", embedder.name, embedder.dim)
        return embedder
    if text.startswith(OPEN_CLIP_PREFIX):
        parts = text.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise EmbeddingError(
                f"bad open_clip spec {text!r}: write 'open_clip:<model name>:<checkpoint file>'"
            )
        return OpenCLIPEmbedder.from_checkpoint(parts[1], parts[2], device=device)
    if text.startswith(LOCAL_DIR_PREFIX):
        folder = Path(text[len(LOCAL_DIR_PREFIX) :])
        if not folder.is_dir():
            raise EmbeddingError(f"embedding model folder not found: {folder}")
        return OpenCLIPEmbedder.from_local_dir(folder, device=device)
    path = Path(text)
    if not path.exists():
        raise EmbeddingError(f"embedding model not found: {path} (accepted: {SPEC_FORMS})")
    if (
        path.is_dir()
        and (path / HF_CONFIG).is_file()
        and (
            not (path / OPEN_CLIP_CONFIG).is_file()
            or _read_json(path / HF_CONFIG).get("model_type") == "clip"
        )
    ):
        return HFCLIPEmbedder.from_folder(path, device=device)
    if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        return OpenCLIPEmbedder.from_local_dir(path, device=device)
    raise EmbeddingError(f"{path} is not an embedding model; accepted: {SPEC_FORMS}")
