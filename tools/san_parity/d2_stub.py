"""Minimal stand-ins for the parts of detectron2 and fvcore that the original SAN model code imports.

The original SAN (MendelXu/SAN) is a detectron2 project; detectron2 cannot be installed here.
``san/model/**`` and ``san/utils/misc.py`` only use a handful of detectron2/fvcore symbols, so this
module registers small fake modules for exactly those in ``sys.modules``:

=====================================================  ==============================================
module                                                 what SAN uses from it
=====================================================  ==============================================
detectron2.config                                      configurable, CfgNode
detectron2.modeling                                    META_ARCH_REGISTRY
detectron2.modeling.postprocessing                     sem_seg_postprocess
detectron2.structures                                  ImageList (+ a tiny Instances for targets)
detectron2.layers                                      ShapeSpec, Conv2d, CNNBlockBase
detectron2.utils.memory                                retry_if_cuda_oom
detectron2.utils.registry                              Registry
detectron2.utils.logger                                log_first_n
detectron2.utils.comm                                  get_world_size
detectron2.projects.point_rend.point_features          point_sample,
                                                       get_uncertain_point_coords_with_randomness
detectron2.data                                        MetadataCatalog
fvcore.nn.weight_init                                  c2_xavier_fill
=====================================================  ==============================================

Everything here is written from detectron2's documented behaviour (no detectron2 code). The
random point sampler draws from torch's global RNG in the same order as detectron2's, so a run
seeded with ``torch.manual_seed`` reproduces detectron2's sampled points.

``san/__init__.py`` and ``san/utils/__init__.py`` pull in datasets, wandb, iopath and more that the
model does not need; :func:`install_san_package` registers ``san`` and ``san.utils`` as bare
packages pointing at the source tree so that ``import san.model`` runs only the model code.

Usage (works from the SAN venv and from the project's tests alike)::

    from tools.san_parity import d2_stub          # or: import d2_stub
    d2_stub.install()
    d2_stub.install_san_package("/tmp/san_orig")
    import san.model
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import importlib.machinery
import inspect
import logging
import os
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "install",
    "uninstall",
    "install_san_package",
    "STUB_MODULES",
    "configurable",
    "CfgNode",
    "Registry",
    "ShapeSpec",
    "Conv2d",
    "CNNBlockBase",
    "ImageList",
    "Instances",
    "sem_seg_postprocess",
    "point_sample",
    "get_uncertain_point_coords_with_randomness",
    "c2_xavier_fill",
]

_STUB_MARK = "__san_parity_stub__"


# --------------------------------------------------------------------------------------------
# detectron2.config
# --------------------------------------------------------------------------------------------
try:  # yacs is detectron2's own config base; use it when present so merges/types behave alike
    from yacs.config import CfgNode as _YacsCfgNode
except ImportError:  # pragma: no cover - yacs is in both venvs
    _YacsCfgNode = None


if _YacsCfgNode is not None:

    class CfgNode(_YacsCfgNode):
        """detectron2's CfgNode is a yacs CfgNode (via fvcore); nothing more is needed by SAN."""

else:  # pragma: no cover

    class CfgNode(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError as e:
                raise AttributeError(name) from e

        def __setattr__(self, name, value):
            self[name] = value


def _is_cfg(obj: Any) -> bool:
    bases: tuple[type, ...] = (CfgNode,)
    if _YacsCfgNode is not None:
        bases = bases + (_YacsCfgNode,)
    try:  # detectron2 also accepts omegaconf DictConfig (LazyConfig); honour it if installed
        from omegaconf import DictConfig

        bases = bases + (DictConfig,)
    except ImportError:
        pass
    return isinstance(obj, bases)


def _cfg_given(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    if args and _is_cfg(args[0]):
        return True
    return _is_cfg(kwargs.get("cfg"))


def _kwargs_from_config(from_config: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> dict:
    """Call ``from_config`` the way detectron2 does and return the kwargs for the real callee.

    The first parameter of ``from_config`` must be ``cfg``. Keyword arguments that ``from_config``
    does not accept (and it has no ``*args``/``**kwargs``) are forwarded unchanged to the callee.
    """
    params = inspect.signature(from_config).parameters
    names = list(params)
    if not names or names[0] != "cfg":
        raise TypeError(f"{from_config.__qualname__}: first argument of from_config must be 'cfg'")
    takes_var = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    kwargs = dict(kwargs)
    passthrough: dict[str, Any] = {}
    if not takes_var:
        for key in list(kwargs):
            if key not in params:
                passthrough[key] = kwargs.pop(key)
    produced = from_config(*args, **kwargs)
    if not isinstance(produced, dict):
        raise TypeError(f"{from_config.__qualname__} must return a dict, got {type(produced)}")
    produced = dict(produced)
    produced.update(passthrough)
    return produced


def configurable(init_func: Callable | None = None, *, from_config: Callable | None = None):
    """detectron2's ``@configurable``.

    * On an ``__init__``: ``Cls(cfg, ...)`` calls ``Cls.from_config(cfg, ...)`` and runs
      ``__init__(self, **returned_dict)``; ``Cls(a=..., b=...)`` calls ``__init__`` directly.
    * As ``@configurable(from_config=fn)`` on a function: same, with ``fn`` building the kwargs.
    """
    if init_func is not None:
        if from_config is not None or not inspect.isfunction(init_func):
            raise TypeError("@configurable on a class must decorate its __init__ without arguments")
        if init_func.__name__ != "__init__":
            raise TypeError("@configurable without arguments only decorates __init__")

        @functools.wraps(init_func)
        def init_wrapper(self, *args, **kwargs):
            builder = getattr(type(self), "from_config", None)
            if builder is None or not inspect.ismethod(builder):
                raise TypeError(f"{type(self).__name__} needs a from_config classmethod for @configurable")
            if _cfg_given(args, kwargs):
                init_func(self, **_kwargs_from_config(builder, args, kwargs))
            else:
                init_func(self, *args, **kwargs)

        return init_wrapper

    if from_config is None:  # used as @configurable() -> behaves like @configurable
        return configurable
    if not inspect.isfunction(from_config):
        raise TypeError("from_config must be a function")

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def func_wrapper(*args, **kwargs):
            if _cfg_given(args, kwargs):
                return func(**_kwargs_from_config(from_config, args, kwargs))
            return func(*args, **kwargs)

        func_wrapper.from_config = from_config
        return func_wrapper

    return decorate


# --------------------------------------------------------------------------------------------
# detectron2.utils.registry (fvcore's Registry)
# --------------------------------------------------------------------------------------------
class Registry:
    """Name -> object map filled by a ``@REG.register()`` decorator (or ``REG.register(obj)``)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._obj_map: dict[str, Any] = {}

    def _add(self, name: str, obj: Any) -> None:
        if name in self._obj_map:
            raise KeyError(f"An object named '{name}' was already registered in '{self._name}' registry!")
        self._obj_map[name] = obj

    def register(self, obj: Any = None):
        if obj is None:

            def deco(target):
                self._add(target.__name__, target)
                return target

            return deco
        self._add(obj.__name__, obj)
        return obj

    def get(self, name: str) -> Any:
        if name not in self._obj_map:
            raise KeyError(f"No object named '{name}' found in '{self._name}' registry!")
        return self._obj_map[name]

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._obj_map.items())

    def __repr__(self) -> str:
        return f"Registry(name={self._name!r}, entries={sorted(self._obj_map)})"


META_ARCH_REGISTRY = Registry("META_ARCH")


# --------------------------------------------------------------------------------------------
# detectron2.utils.logger / comm / memory
# --------------------------------------------------------------------------------------------
_LOG_COUNTER: Counter = Counter()


def _caller_key() -> tuple[str, int, str]:
    frame = sys._getframe(2)
    return (frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "?"))


def log_first_n(lvl: int, msg: str, n: int = 1, *, name: str | None = None, key: Any = "caller") -> None:
    """Log ``msg`` only the first ``n`` times for the given key ("caller", "message" or both)."""
    if isinstance(key, str):
        key = (key,)
    caller = _caller_key()
    ident: tuple = ()
    if "caller" in key:
        ident = ident + caller
    if "message" in key:
        ident = ident + (msg,)
    _LOG_COUNTER[ident] += 1
    if _LOG_COUNTER[ident] <= n:
        logging.getLogger(name or caller[2]).log(lvl, msg)


def get_world_size() -> int:
    return 1


def retry_if_cuda_oom(func: Callable) -> Callable:
    """detectron2 retries on CUDA OOM; on a single run without OOM it is the identity."""
    return func


# --------------------------------------------------------------------------------------------
# detectron2.layers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShapeSpec:
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that optionally applies ``norm`` then ``activation`` after the convolution."""

    def __init__(self, *args, **kwargs) -> None:
        norm = kwargs.pop("norm", None)
        activation = kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class CNNBlockBase(nn.Module):
    """A block with ``in_channels``, ``out_channels`` and ``stride`` attributes, and ``freeze()``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def freeze(self) -> CNNBlockBase:
        for p in self.parameters():
            p.requires_grad = False
        return self


# --------------------------------------------------------------------------------------------
# detectron2.structures
# --------------------------------------------------------------------------------------------
class ImageList:
    """A padded batch (``tensor``, N x C x H x W) with the unpadded ``image_sizes`` [(h, w), ...]."""

    def __init__(self, tensor: torch.Tensor, image_sizes: list[tuple[int, int]]) -> None:
        self.tensor = tensor
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx: int) -> torch.Tensor:
        h, w = self.image_sizes[idx]
        return self.tensor[idx, ..., :h, :w]

    def to(self, *args, **kwargs) -> ImageList:
        return ImageList(self.tensor.to(*args, **kwargs), self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @staticmethod
    def from_tensors(
        tensors: list[torch.Tensor],
        size_divisibility: int = 0,
        pad_value: float = 0.0,
        padding_constraints: dict[str, int] | None = None,
    ) -> ImageList:
        """Pad every (…, H, W) tensor at the bottom/right with ``pad_value`` to one common size.

        The common size is the per-dimension maximum; its last two dims are rounded up to a
        multiple of ``size_divisibility`` when that is > 1 (``padding_constraints`` may override
        it, or ask for a square result, as in detectron2).
        """
        if not tensors:
            raise ValueError("ImageList.from_tensors needs at least one tensor")
        lead = tensors[0].shape[:-2]
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.shape[:-2] != lead:
                raise ValueError("all tensors must share their leading dims")
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in image_sizes)
        max_w = max(w for _, w in image_sizes)
        if padding_constraints is not None:
            if padding_constraints.get("square_size", 0) > 0:
                max_h = max_w = int(padding_constraints["square_size"])
            if "size_divisibility" in padding_constraints:
                size_divisibility = padding_constraints["size_divisibility"]
        if size_divisibility > 1:
            s = int(size_divisibility)
            max_h = (max_h + s - 1) // s * s
            max_w = (max_w + s - 1) // s * s
        batch = tensors[0].new_full((len(tensors),) + tuple(lead) + (max_h, max_w), pad_value)
        for dst, src in zip(batch, tensors):
            dst[..., : src.shape[-2], : src.shape[-1]].copy_(src)
        return ImageList(batch.contiguous(), image_sizes)


class Instances:
    """Just enough of detectron2's Instances for SAN's training targets.

    Holds ``image_size`` plus arbitrary fields (``gt_masks``, ``gt_classes``); ``to()`` moves every
    tensor field.
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        object.__setattr__(self, "_image_size", tuple(image_size))
        object.__setattr__(self, "_fields", {})
        for k, v in fields.items():
            self.set(k, v)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def set(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def get(self, name: str) -> Any:
        return self._fields[name]

    def has(self, name: str) -> bool:
        return name in self._fields

    def get_fields(self) -> dict[str, Any]:
        return self._fields

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError as e:
            raise AttributeError(f"Cannot find field '{name}' in the given Instances!") from e

    def to(self, *args, **kwargs) -> Instances:
        out = Instances(self._image_size)
        for k, v in self._fields.items():
            out.set(k, v.to(*args, **kwargs) if hasattr(v, "to") else v)
        return out

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        raise NotImplementedError("Empty Instances does not support __len__!")

    def __repr__(self) -> str:
        return f"Instances(image_size={self._image_size}, fields={list(self._fields)})"


# --------------------------------------------------------------------------------------------
# detectron2.modeling.postprocessing
# --------------------------------------------------------------------------------------------
def sem_seg_postprocess(
    result: torch.Tensor, img_size: tuple[int, int], output_height: int, output_width: int
) -> torch.Tensor:
    """Crop a (C, H_pad, W_pad) map to the unpadded ``img_size``, then resize it bilinearly
    (align_corners=False) to (output_height, output_width)."""
    cropped = result[:, : img_size[0], : img_size[1]]
    resized = F.interpolate(
        cropped[None], size=(output_height, output_width), mode="bilinear", align_corners=False
    )
    return resized[0]


# --------------------------------------------------------------------------------------------
# detectron2.projects.point_rend.point_features
# --------------------------------------------------------------------------------------------
def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sample ``input`` (N, C, H, W) at normalised [0, 1] x [0, 1] ``point_coords`` (N, P, 2) or
    (N, Hg, Wg, 2), with ``F.grid_sample`` on ``2 * coords - 1``; returns (N, C, P) or
    (N, C, Hg, Wg)."""
    three_d = point_coords.dim() == 3
    grid = point_coords[:, :, None, :] if three_d else point_coords
    out = F.grid_sample(input, 2.0 * grid - 1.0, **kwargs)
    return out[..., 0] if three_d else out


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """PointRend's training-time point selection, drawing from torch's global RNG like detectron2:

    1. ``torch.rand(R, int(num_points * oversample_ratio), 2)`` candidate points;
    2. keep the ``int(importance_sample_ratio * num_points)`` most uncertain of them per row
       (``uncertainty_func`` on the point-sampled logits, ``torch.topk``);
    3. append ``torch.rand(R, num_points - kept, 2)`` uniformly random points.
    Returns (R, num_points, 2) coordinates in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError("oversample_ratio must be >= 1")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError("importance_sample_ratio must be in [0, 1]")
    device = coarse_logits.device
    num_boxes = coarse_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num_boxes, num_candidates, 2, device=device)
    uncertainty = uncertainty_func(point_sample(coarse_logits, candidates, align_corners=False))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1).indices  # (R, num_uncertain)
    chosen = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(num_boxes, num_random, 2, device=device)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen


# --------------------------------------------------------------------------------------------
# detectron2.data.MetadataCatalog (only .get(name) with attribute storage)
# --------------------------------------------------------------------------------------------
class _Metadata(types.SimpleNamespace):
    def set(self, **kwargs: Any) -> _Metadata:
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


class _MetadataCatalog:
    def __init__(self) -> None:
        self._items: dict[str, _Metadata] = {}

    def get(self, name: str) -> _Metadata:
        if name not in self._items:
            self._items[name] = _Metadata(name=name)
        return self._items[name]

    def list(self) -> builtins.list[str]:
        return list(self._items)

    def remove(self, name: str) -> None:
        self._items.pop(name, None)


MetadataCatalog = _MetadataCatalog()


# --------------------------------------------------------------------------------------------
# fvcore.nn.weight_init
# --------------------------------------------------------------------------------------------
def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as fvcore implements it: kaiming_uniform_(a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def c2_msra_fill(module: nn.Module) -> None:
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


# --------------------------------------------------------------------------------------------
# installation into sys.modules
# --------------------------------------------------------------------------------------------
def _module_contents() -> dict[str, dict[str, Any]]:
    return {
        "detectron2": {},
        "detectron2.config": {"configurable": configurable, "CfgNode": CfgNode},
        "detectron2.modeling": {"META_ARCH_REGISTRY": META_ARCH_REGISTRY},
        "detectron2.modeling.postprocessing": {"sem_seg_postprocess": sem_seg_postprocess},
        "detectron2.structures": {"ImageList": ImageList, "Instances": Instances},
        "detectron2.layers": {"ShapeSpec": ShapeSpec, "Conv2d": Conv2d, "CNNBlockBase": CNNBlockBase},
        "detectron2.utils": {},
        "detectron2.utils.memory": {"retry_if_cuda_oom": retry_if_cuda_oom},
        "detectron2.utils.registry": {"Registry": Registry},
        "detectron2.utils.logger": {"log_first_n": log_first_n},
        "detectron2.utils.comm": {"get_world_size": get_world_size},
        "detectron2.projects": {},
        "detectron2.projects.point_rend": {},
        "detectron2.projects.point_rend.point_features": {
            "point_sample": point_sample,
            "get_uncertain_point_coords_with_randomness": get_uncertain_point_coords_with_randomness,
        },
        "detectron2.data": {"MetadataCatalog": MetadataCatalog},
        "fvcore": {},
        "fvcore.nn": {},
        "fvcore.nn.weight_init": {"c2_xavier_fill": c2_xavier_fill, "c2_msra_fill": c2_msra_fill},
    }


STUB_MODULES: tuple[str, ...] = tuple(_module_contents())


def _make_module(name: str, attrs: dict[str, Any], package: bool) -> types.ModuleType:
    mod = types.ModuleType(name, f"san_parity stand-in for {name}")
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # a package with no files: only the submodules registered here exist
    setattr(mod, _STUB_MARK, True)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def install(force: bool = False) -> None:
    """Register the stand-in modules in ``sys.modules`` (idempotent).

    If a real ``detectron2`` (or ``fvcore``) is already imported it is left alone unless
    ``force=True``.
    """
    contents = _module_contents()
    for root in ("detectron2", "fvcore"):
        existing = sys.modules.get(root)
        if existing is not None and not getattr(existing, _STUB_MARK, False) and not force:
            contents = {k: v for k, v in contents.items() if k != root and not k.startswith(root + ".")}
    names = set(contents)
    for name, attrs in contents.items():
        current = sys.modules.get(name)
        if current is not None and getattr(current, _STUB_MARK, False):
            continue
        is_pkg = any(other.startswith(name + ".") for other in names)
        sys.modules[name] = _make_module(name, attrs, is_pkg)
    for name in contents:  # link children as attributes of their parents (import machinery does)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            if parent in sys.modules:
                setattr(sys.modules[parent], child, sys.modules[name])


def uninstall() -> None:
    """Remove the stand-ins from ``sys.modules``, and with the ``san`` shim every ``san.*`` module
    imported through it (they hold references to the stand-ins)."""
    if getattr(sys.modules.get("san"), _STUB_MARK, False):
        for name in list(sys.modules):
            if name == "san" or name.startswith("san."):
                del sys.modules[name]
    for name in list(sys.modules):
        if getattr(sys.modules[name], _STUB_MARK, False):
            del sys.modules[name]


def install_san_package(san_root: str, purge: bool = True) -> None:
    """Make ``san`` and ``san.utils`` importable as bare packages rooted at ``<san_root>/san``.

    Their ``__init__`` files are NOT executed (they import datasets, wandb, iopath, TTA, …);
    ``import san.model`` / ``import san.config`` / ``from san.utils.misc import …`` then load
    exactly the original files. With ``purge`` any previously imported ``san*`` modules are dropped.
    """
    pkg_dir = os.path.join(os.path.abspath(san_root), "san")
    if not os.path.isfile(os.path.join(pkg_dir, "model", "san.py")):
        raise FileNotFoundError(f"{pkg_dir}/model/san.py not found: is {san_root} a SAN checkout?")
    if purge:
        for name in list(sys.modules):
            if name == "san" or name.startswith("san."):
                del sys.modules[name]
    for name, path in (("san", pkg_dir), ("san.utils", os.path.join(pkg_dir, "utils"))):
        mod = types.ModuleType(name, f"san_parity shim for {path} (its __init__ is not run)")
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [path]
        mod.__spec__ = spec
        mod.__path__ = [path]
        mod.__file__ = None
        setattr(mod, _STUB_MARK, True)
        sys.modules[name] = mod
    sys.modules["san"].utils = sys.modules["san.utils"]
