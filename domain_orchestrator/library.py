"""The adapter library: one PEFT LoRA adapter per training domain (its prototype: :mod:`.prototypes`).

On disk (the layout of the released SemLA ``loradb`` and of our training)::

    loradb/
      <domain>/adapter_config.json            PEFT LoraConfig (r, lora_alpha, target_modules, ...)
      <domain>/adapter_model.safetensors      base_model.model.<module>.lora_A.weight (r, in)
                                              base_model.model.<module>.lora_B.weight (out, r)
      <domain>/<domain>_statistics.npz        train_average_embedding (1, D): mean CLIP image embedding

:class:`AdapterLibrary` validates every adapter before use (errors name the adapter and the problem)
and holds, per target layer, the A and B matrices of all adapters stacked once:
``A (N, R, in)`` and ``B (N, out, R)``, R the largest rank (smaller ranks are zero padded, which adds
nothing), with the per-adapter scaling ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA) kept separately.
Adapters are read from safetensors only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cat_seg.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    read_adapter,
    read_training_record,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = ADAPTER_CONFIG_NAME
ADAPTER_WEIGHTS = ADAPTER_WEIGHTS_NAME
_PREFIX = "base_model.model."


class AdapterLibraryError(ValueError):
    """An adapter folder that cannot be used; the message names the adapter and the problem."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the library keeps of one adapter besides its tensors."""

    name: str
    folder: Path
    rank: int
    alpha: float
    scaling: float
    target_modules: tuple[str, ...]
    #: trained with ``MODEL.LORA.REFERENCE_TRAINING`` (the original trainer's behaviour), as recorded in
    #: the folder's ``semla_training.json``; False for adapters without that file (released ones included).
    reference_training: bool = False


@dataclass
class LayerStack:
    """All adapters' LoRA factors for one target layer.

    Attributes:
        A: (N, R, in) down projections (zero rows beyond an adapter's rank, zeros if it skips the layer).
        B: (N, out, R) up projections.
    """

    A: Tensor
    B: Tensor


def _read_files(folder: Path, name: str) -> tuple[dict, dict[str, Tensor]]:
    """The adapter's config and tensors (``cat_seg.lora.read_adapter``), with the options fusion supports."""
    for file_name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / file_name).is_file():
            only = " (adapters are read from safetensors only)" if file_name == ADAPTER_WEIGHTS else ""
            raise AdapterLibraryError(f"adapter {name!r}: missing {folder / file_name}{only}")
    try:
        config, tensors = read_adapter(folder)
    except (AdapterError, OSError) as e:
        raise AdapterLibraryError(f"adapter {name!r}: {e}") from None
    path = folder / ADAPTER_CONFIG
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterLibraryError(f"adapter {name!r}: {path} needs a positive {key!r}, got {value!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias != 'none'": config.get("bias", "none") != "none",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterLibraryError(f"adapter {name!r}: unsupported LoRA options in {path}: {', '.join(bad)}")
    return config, tensors


def _pair_tensors(tensors: dict[str, Tensor], name: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (A, B)}`` from PEFT's saved names; anything else is an error."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(_PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(_PREFIX) : -len(suffix)], {})[part] = value
                break
        else:
            raise AdapterLibraryError(
                f"adapter {name!r}: unexpected tensor {key!r} (expected {_PREFIX}<module>.lora_A/lora_B.weight)"
            )
    out = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterLibraryError(f"adapter {name!r}: module {module!r} has only {sorted(parts)}")
        out[module] = (parts["lora_A"], parts["lora_B"])
    if not out:
        raise AdapterLibraryError(f"adapter {name!r}: no LoRA tensors")
    return out


class AdapterLibrary:
    """Validated, stacked LoRA adapters (their domains' prototypes: :func:`.prototypes.load_prototypes`).

    Use :meth:`open` to read a ``loradb/`` folder. Attributes:
        names: adapter (domain) names, in library order (= column order of weight matrices).
        infos: per-adapter metadata.
        layers: target module name -> :class:`LayerStack`.
        scalings: (N,) LoRA scaling of each adapter.
    """

    def __init__(
        self,
        *,
        infos: Sequence[AdapterInfo],
        layers: dict[str, LayerStack],
    ) -> None:
        self.infos = list(infos)
        self.names = [info.name for info in self.infos]
        self.layers = layers
        self.scalings = torch.tensor([info.scaling for info in self.infos], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"AdapterLibrary({len(self)} adapters, {len(self.layers)} target layers)"

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).A.device

    def index(self, names: str | Sequence[str]) -> list[int]:
        """Library positions of adapter names (unknown names are an error)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"adapters not in the library: {unknown}; the library has {self.names}")
        return [self.names.index(n) for n in names]

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> AdapterLibrary:
        """Move the stacked tensors (in place) and return self."""
        for stack in self.layers.values():
            stack.A = stack.A.to(device=device, dtype=dtype)
            stack.B = stack.B.to(device=device, dtype=dtype)
        return self

    def num_parameters(self) -> int:
        return sum(s.A.numel() + s.B.numel() for s in self.layers.values())

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        names: Sequence[str] | None = None,
        *,
        model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AdapterLibrary:
        """Read and validate adapters from a library folder.

        Args:
            root: the library folder (``loradb/``).
            names: adapters to open, in this order; default: every sub-folder holding an
                ``adapter_config.json``, sorted by name.
            model: the base model the adapters will be fused into; when given, every target module must
                exist there as an ``nn.Linear`` with matching shapes.
            device, dtype: where and how to hold the stacked tensors.
        Raises:
            AdapterLibraryError: naming each adapter that cannot be used and why (all of them, after
                reading every adapter).
        """
        root = Path(root)
        if not root.is_dir():
            raise AdapterLibraryError(f"adapter library folder not found: {root}")
        if names is None:
            names = sorted(p.name for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file())
            if not names:
                raise AdapterLibraryError(f"no adapters (sub-folders with {ADAPTER_CONFIG}) in {root}")
        names = list(names)
        if len(set(names)) != len(names):
            raise AdapterLibraryError(f"adapter names repeat: {names}")
        modules = dict(model.named_modules()) if model is not None else None

        infos: list[AdapterInfo] = []
        factors: list[dict[str, tuple[Tensor, Tensor]]] = []
        problems: list[str] = []
        for name in names:
            try:
                info, pairs = _read_adapter(root / name, name, modules)
            except AdapterLibraryError as e:
                problems.append(str(e))
                continue
            infos.append(info)
            factors.append(pairs)
        if len(problems) == 1:
            raise AdapterLibraryError(problems[0])
        if problems:
            raise AdapterLibraryError(
                f"{len(problems)} adapters in {root} cannot be used:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )

        layers = _stack(factors, device=device, dtype=dtype)
        library = cls(infos=infos, layers=layers)
        logger.info(
            "opened %r from %s (%.1fM LoRA parameters)", library, root, library.num_parameters() / 1e6
        )
        return library


def _read_adapter(
    folder: Path, name: str, modules: dict[str, nn.Module] | None
) -> tuple[AdapterInfo, dict[str, tuple[Tensor, Tensor]]]:
    """Read and check one adapter folder: its info and ``{module: (A, B)}``."""
    if not folder.is_dir():
        raise AdapterLibraryError(f"adapter {name!r}: folder not found: {folder}")
    config, tensors = _read_files(folder, name)
    pairs = _pair_tensors(tensors, name)
    rank = int(config["r"])
    for module, (a, b) in pairs.items():
        _check_pair(name, module, a, b, rank, modules)
    alpha = float(config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        record = read_training_record(folder) or {}
    except AdapterError as e:
        raise AdapterLibraryError(f"adapter {name!r}: {e}") from None
    info = AdapterInfo(
        name, folder, rank, alpha, scaling, tuple(sorted(pairs)), bool(record.get("reference_training"))
    )
    return info, pairs


def _check_pair(
    name: str, module: str, a: Tensor, b: Tensor, rank: int, modules: dict[str, nn.Module] | None
) -> None:
    where = f"adapter {name!r}, module {module!r}"
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterLibraryError(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match rank r={rank}"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterLibraryError(f"{where}: NaN or Inf in the LoRA tensors")
    if modules is None:
        return
    layer = modules.get(module)
    if layer is None:
        raise AdapterLibraryError(f"{where}: the model has no module of that name (wrong target name)")
    layer = getattr(layer, "base_layer", layer)
    if not isinstance(layer, nn.Linear):
        raise AdapterLibraryError(f"{where}: target is a {type(layer).__name__}, not nn.Linear")
    if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
        raise AdapterLibraryError(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the layer "
            f"({layer.in_features} -> {layer.out_features})"
        )


def _stack(
    factors: Sequence[dict[str, tuple[Tensor, Tensor]]], *, device: str | torch.device, dtype: torch.dtype
) -> dict[str, LayerStack]:
    """Stack every adapter's (A, B) per layer, zero-padding ranks and missing layers."""
    targets = sorted({m for pairs in factors for m in pairs})
    layers = {}
    for module in targets:
        present = [pairs[module] for pairs in factors if module in pairs]
        in_features = {a.shape[1] for a, _ in present}
        out_features = {b.shape[0] for _, b in present}
        if len(in_features) != 1 or len(out_features) != 1:
            raise AdapterLibraryError(f"module {module!r}: adapters disagree on its shape")
        rank = max(a.shape[0] for a, _ in present)
        stack_a = torch.zeros(len(factors), rank, in_features.pop(), dtype=dtype)
        stack_b = torch.zeros(len(factors), out_features.pop(), rank, dtype=dtype)
        for i, pairs in enumerate(factors):
            if module in pairs:
                a, b = pairs[module]
                stack_a[i, : a.shape[0]] = a
                stack_b[i, :, : b.shape[1]] = b
        layers[module] = LayerStack(stack_a.to(device), stack_b.to(device))
    return layers
