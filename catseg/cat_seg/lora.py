"""LoRA on a CAT-Seg model: which modules adapters address, and the project's own PEFT-compatible LoRA.

SemLA trains PEFT LoRA adapters on an explicit list of module paths (``MODEL.LORA.MODUELS``, 214 names
for CAT-Seg ViT-L/14@336px). :func:`resolve_target_modules` checks such a list against a built model,
or derives the equivalent selection for any preset when the list is empty.

The rest of this module is a small re-implementation of what SemLA uses of PEFT's LoRA, so that
training and evaluating an adapter do not import ``peft`` (which imports ``transformers``: 10-15 s of
start-up on a small machine). It mirrors PEFT's vocabulary and invariants, and is tested against PEFT:

- :class:`LoraLinear` wraps a target ``nn.Linear`` as PEFT's ``lora.Linear`` does (``base_layer``,
  ``lora_A`` / ``lora_B`` / ``lora_dropout`` ``ModuleDict`` s keyed by adapter name) and computes
  ``base(x) + scaling * lora_B(lora_A(dropout(x)))`` with ``scaling = lora_alpha / r`` (rsLoRA:
  ``lora_alpha / sqrt(r)``). A new adapter draws A exactly as PEFT does (same random stream: the two
  ``nn.Linear`` constructions, then Kaiming-uniform with ``a = sqrt(5)`` on A) and sets B to zero.
- :class:`LoraModel` holds the model as ``base_model.model``, PEFT's ``PeftModel`` / ``LoraModel``
  nesting, so parameter names are PEFT's (``base_model.model.<module>.base_layer.weight``,
  ``base_model.model.<module>.lora_A.<adapter>.weight``): training checkpoints written with PEFT load.
- :meth:`LoraModel.save_pretrained` writes PEFT's adapter folder: ``adapter_config.json`` with the
  fields and values PEFT's ``LoraConfig`` writes (the format of the locked PEFT version) and
  ``adapter_model.safetensors`` with PEFT's key names (``base_model.model.<module>.lora_A.weight``).
  :func:`read_adapter` / :meth:`LoraModel.load_adapter` read such a folder, PEFT's or ours.

Supported natively: plain LoRA on ``nn.Linear`` targets with any rank, alpha, dropout and rsLoRA, bias
``"none"``. Anything else (DoRA, trained biases, rank/alpha patterns, ...) is reported by
:func:`unsupported_options`; the engine hands such adapters to PEFT.

One addition PEFT does not have: *inert* modules (:meth:`LoraModel.add_adapter`), which hold an adapter's
factors (saved with it) without ever applying them, as the original SemLA trainer left the LoRA on the
CLIP attention q/k/v projections (``MODEL.LORA.REFERENCE_TRAINING``). An adapter trained so records it in
``semla_training.json`` beside its PEFT files (:func:`read_training_record`); PEFT ignores that file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import reference_lora_target_modules

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "TRAINING_RECORD_NAME",
    "AdapterError",
    "check_adapter_folder",
    "LoraLinear",
    "LoraModel",
    "LoraSpec",
    "clip_attention_projections",
    "matches_target",
    "peft_adapter_config",
    "read_adapter",
    "read_training_record",
    "resolve_target_modules",
    "semla_target_modules",
    "unsupported_options",
    "write_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Where PEFT nests the adapted model: ``PeftModel.base_model`` (a ``LoraModel``) ``.model``.
PEFT_PREFIX = "base_model.model."
#: How an adapter was trained, beside its PEFT files (written by reference-mode training runs).
TRAINING_RECORD_NAME = "semla_training.json"
_CLIP_ATTENTION_PROJECTION = re.compile(
    r"(^|\.)clip_model\.(visual\.)?transformer\.resblocks\.\d+\.attn\.[qkv]_proj$"
)

#: ``adapter_config.json`` as PEFT 0.21.2 (the version in ``uv.lock``) writes it for a LoRA adapter on a
#: model that is not a Hugging Face model, before the adapter's own values (``r``, ``lora_alpha``,
#: ``target_modules``, ...) and ``auto_mapping`` are filled in. A test compares the whole file with the one
#: PEFT writes. Older PEFT releases read it (they ignore, with a warning, the fields they do not know).
_PEFT_LORA_CONFIG: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

#: Config fields that describe the adapter without changing what the native LoRA computes.
_DESCRIPTIVE_FIELDS = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version",
        "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
        "init_lora_weights", "megatron_core", "qalora_group_size",
    }
)  # fmt: skip


class AdapterError(ValueError):
    """An adapter folder, name or file that cannot be used; the message names it."""


def semla_target_modules(model: nn.Module) -> list[str]:
    """The original's LoRA selection for this model's depth.

    CLIP visual and text blocks (attn ``q_proj``/``k_proj``/``v_proj``, mlp ``c_fc``/``c_proj``) and the
    aggregator layers (swin ``q``/``k``/``v``/``proj``/``fc1``/``fc2``, class attention ``q``/``k``/``v``,
    ``MLP.0``/``MLP.2``), in the original's order. For the ``vitl_336`` preset this is exactly the
    original's 214-name list.

    A model family with its own selection provides ``model.lora_target_modules()`` (SAN: CLIP
    q/k/v/c_fc/c_proj of both towers, the side ViT's qkv/proj/fc1/fc2, the mask decoder's query MLP).
    """
    own = getattr(model, "lora_target_modules", None)
    if callable(own):
        return list(own())
    predictor = model.sem_seg_head.predictor
    return list(
        reference_lora_target_modules(
            num_visual_layers=len(predictor.clip_model.visual.transformer.resblocks),
            num_text_layers=len(predictor.clip_model.transformer.resblocks),
            num_aggregator_layers=len(predictor.transformer.layers),
        )
    )


def resolve_target_modules(names: Sequence[str], model: nn.Module) -> list[str]:
    """Check LoRA target names against a model (or derive them when ``names`` is empty).

    Args:
        names: full module paths relative to the CAT-Seg model (``MODEL.LORA.MODUELS``); empty = the
            original's selection for this model (:func:`semla_target_modules`).
        model: the CAT-Seg model the adapters attach to (LoRA-wrapped layers are accepted).
    Returns:
        the target names, each an ``nn.Linear`` of ``model``.
    Raises:
        ValueError: names the model does not have, or that are not Linear layers.
    """
    names = list(names) if names else semla_target_modules(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA target module(s) do not exist in this model "
            f"(e.g. {', '.join(missing[:3])}); MODEL.LORA.MODUELS must match the model preset "
            "(an empty list selects the original's modules for any preset)"
        )
    not_linear = [
        n for n in names if not isinstance(getattr(modules[n], "base_layer", modules[n]), nn.Linear)
    ]
    if not_linear:
        raise ValueError(f"LoRA target modules must be nn.Linear layers: {', '.join(not_linear[:5])}")
    return names


def clip_attention_projections(names: Sequence[str]) -> list[str]:
    """The CLIP attention ``q_proj``/``k_proj``/``v_proj`` modules (image and text towers) among ``names``.

    These are the LoRA targets the original SemLA code never calls (docs/differences.md#q1): 108 of the 214
    for CAT-Seg (L).
    """
    return [n for n in names if _CLIP_ATTENTION_PROJECTION.search(n)]


def matches_target(target_modules: str | Sequence[str], name: str) -> bool:
    """PEFT's rule for ``target_modules``: a string is a regular expression the whole module path must
    match; a list names modules by full path or by a suffix of whole path components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


@dataclass(frozen=True)
class LoraSpec:
    """The settings of one plain LoRA adapter, under PEFT's ``LoraConfig`` field names.

    Attributes:
        r: rank, > 0.
        lora_alpha: alpha, > 0; ``scaling = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
        target_modules: module paths (full or suffixes), or a regular expression (PEFT's rule,
            :func:`matches_target`).
        lora_dropout: dropout on the LoRA branch's input while training, in [0, 1).
        use_rslora: rank-stabilised scaling.
    """

    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]
    lora_dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    @property
    def scaling(self) -> float:
        """The factor of ``B A x`` (PEFT: ``lora_alpha / r``, rsLoRA ``lora_alpha / sqrt(r)``)."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @classmethod
    def from_adapter_config(
        cls, config: Mapping[str, Any], *, source: str = "adapter_config.json"
    ) -> LoraSpec:
        """The spec of a PEFT ``adapter_config.json`` (call :func:`unsupported_options` first).

        Raises:
            AdapterError: missing or invalid values, naming ``source``.
        """
        targets = config.get("target_modules")
        if not isinstance(targets, (str, list)) or not targets:
            raise AdapterError(
                f"{source}: target_modules must be a non-empty list or a pattern, got {targets!r}"
            )
        try:
            return cls(
                r=config.get("r"),  # type: ignore[arg-type]
                lora_alpha=config.get("lora_alpha"),  # type: ignore[arg-type]
                target_modules=targets if isinstance(targets, str) else tuple(targets),
                lora_dropout=float(config.get("lora_dropout") or 0.0),
                use_rslora=bool(config.get("use_rslora")),
            )
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{source}: {e}") from None


def peft_adapter_config(spec: LoraSpec, model: nn.Module | None, **options: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT's ``save_pretrained`` writes for this adapter on ``model``.

    Args:
        spec: the adapter's settings.
        model: the adapted model (its class goes into ``auto_mapping``, as PEFT records it); None:
            ``auto_mapping`` null.
        options: further PEFT fields (``bias``, ``use_dora``, ...); must be fields PEFT writes.
    Returns:
        the JSON object, every field of PEFT's ``LoraConfig``.
    """
    unknown = sorted(set(options) - set(_PEFT_LORA_CONFIG))
    if unknown:
        raise ValueError(f"not fields of PEFT's LoraConfig: {unknown}")
    return {
        **_PEFT_LORA_CONFIG,
        "auto_mapping": None
        if model is None
        else {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": spec.target_modules
        if isinstance(spec.target_modules, str)
        else list(spec.target_modules),
        "use_rslora": spec.use_rslora,
        **options,
    }


def unsupported_options(config: Mapping[str, Any]) -> list[str]:
    """The settings of a PEFT LoRA config that the native LoRA does not implement.

    Native: plain LoRA (any rank, alpha, dropout, rsLoRA) with bias ``"none"``. Anything else (DoRA,
    trained biases, rank/alpha patterns, layer selections, modules to save, ...) is returned as
    ``"key=value"``; an empty list means the native LoRA computes what PEFT would.
    """
    out = []
    for key, value in sorted(config.items()):
        if key in _DESCRIPTIVE_FIELDS:
            continue
        neutral = value == "none" if key == "bias" else value in (None, False, {}, [], "")
        if not neutral:
            out.append(f"{key}={value!r}")
    if config.get("peft_type", "LORA") != "LORA":
        out.append(f"peft_type={config.get('peft_type')!r}")
    return out


class LoraLinear(nn.Module):
    """An ``nn.Linear`` with LoRA adapters (PEFT's ``lora.Linear``, plain LoRA only).

    ``y = base_layer(x) + sum over active adapters of scaling * lora_B(lora_A(lora_dropout(x)))``.

    Args:
        base_layer: the wrapped Linear (its parameters keep their values; their names gain
            ``base_layer.``).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (as PEFT's wrapper exposes it)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, spec: LoraSpec, *, init: bool = True) -> None:
        """Add adapter ``name``: A (r, in) and B (out, r), on the base layer's device.

        Args:
            name: the adapter name (key of the ``ModuleDict`` s).
            spec: rank, alpha, dropout and scaling rule.
            init: draw A as PEFT does, from the global torch generator, on the CPU: the two
                ``nn.Linear`` constructions (Kaiming-uniform each), then Kaiming-uniform with
                ``a = sqrt(5)`` on A again (PEFT's ``reset_lora_parameters``); B = 0. So a seeded
                run draws the same A as PEFT's ``get_peft_model``. False: uninitialised (to be loaded),
                without touching the random stream.
        """
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        if dtype in (torch.float16, torch.bfloat16):  # PEFT's autocast_adapter_dtype keeps adapters in fp32
            dtype = torch.float32
        if init:
            lora_a = nn.Linear(self.in_features, spec.r, bias=False)
            lora_b = nn.Linear(spec.r, self.out_features, bias=False)
            # https://github.com/microsoft/LoRA/blob/a0a92e0f26c067cf94747bdbf1ce73793fa44d19/loralib/layers.py#L124
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        else:
            lora_a = nn.utils.skip_init(nn.Linear, self.in_features, spec.r, bias=False)
            lora_b = nn.utils.skip_init(nn.Linear, spec.r, self.out_features, bias=False)
        self.lora_dropout[name] = nn.Dropout(p=spec.lora_dropout) if spec.lora_dropout > 0 else nn.Identity()
        self.lora_A[name] = lora_a.to(device=weight.device, dtype=dtype)
        self.lora_B[name] = lora_b.to(device=weight.device, dtype=dtype)
        self.r[name] = spec.r
        self.lora_alpha[name] = spec.lora_alpha
        self.scaling[name] = spec.scaling

    def delta_weight(self, name: str) -> Tensor:
        """``scaling * B @ A`` (out, in): what adapter ``name`` adds to the base weight."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        result = self.base_layer(x)
        result_dtype = result.dtype
        for name in self.active_adapters:
            lora_a = self.lora_A[name]
            if x.dtype != lora_a.weight.dtype and x.dtype.is_floating_point:
                x = x.to(lora_a.weight.dtype)
            result = result + self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]
        return result.to(result_dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.r)}, active={self.active_adapters}"


class _Tuner(nn.Module):
    """The place of PEFT's ``LoraModel`` in the module tree: holds the adapted model as ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class LoraModel(nn.Module):
    """A model with LoRA adapters, laid out as PEFT's ``PeftModel`` (``base_model.model.<module>``).

    The wrapped model is modified in place (its target Linear layers become :class:`LoraLinear`), so
    :meth:`get_base_model` computes with the active adapter, as with PEFT. Calling this module calls
    the wrapped model; unknown attributes are looked up on it.

    Args:
        model: the model to adapt.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = _Tuner(model)
        #: adapter name -> settings (PEFT's attribute name).
        self.peft_config: dict[str, LoraSpec] = {}
        #: adapter name -> module paths that hold it without applying it (see :meth:`add_adapter`).
        self.inert_modules: dict[str, frozenset[str]] = {}
        self.active_adapter: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        """The adapted model (with the LoRA layers in it)."""
        return self.base_model.model

    def lora_layers(self) -> Iterator[tuple[str, LoraLinear]]:
        """``(module path in the adapted model, layer)`` of every LoRA layer, in module order."""
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, LoraLinear):
                yield name, module

    def add_adapter(
        self,
        name: str,
        spec: LoraSpec,
        *,
        init: bool = True,
        trainable: bool = True,
        inert_modules: Sequence[str] = (),
    ) -> list[str]:
        """Put adapter ``name`` on every module ``spec.target_modules`` selects, and make it the active one.

        Modules are wrapped in module order, as PEFT does, so seeded initialisations draw the same
        numbers. With ``trainable``, every parameter of the model is frozen except this adapter's A and
        B (PEFT's rule); otherwise the adapter is frozen too.

        ``inert_modules`` get the adapter like every target (initialised, trainable, saved), but their
        layers never apply it: the factors get no gradient, so an optimizer that skips gradient-less
        parameters (AdamW, SGD) leaves them at their initial values (A as drawn, B = 0). This is what the
        original SemLA trainer did, unknowingly, to the CLIP attention q/k/v projections.

        Args:
            name: adapter name.
            spec: its settings.
            init: PEFT's initialisation (see :meth:`LoraLinear.add_adapter`); False to load values next.
            trainable: leave the new adapter's factors trainable.
            inert_modules: module paths (among the targets) that hold the adapter without applying it.
        Returns:
            the adapted module paths, in module order.
        Raises:
            ValueError: the name is taken, no module matches, a match is not an ``nn.Linear``, or an inert
                module is not a target.
        """
        if name in self.peft_config:
            raise ValueError(f"adapter {name!r} already exists")
        model = self.get_base_model()
        inside_lora = re.compile(r"\.(base_layer|lora_A|lora_B|lora_dropout)(\.|$)")
        matched = [
            (path, module)
            for path, module in model.named_modules()
            if path and not inside_lora.search(path) and matches_target(spec.target_modules, path)
        ]
        if not matched:
            raise ValueError(f"target modules {_short(spec.target_modules)} match no module of the model")
        bad = [p for p, m in matched if not isinstance(m, (nn.Linear, LoraLinear))]
        if bad:
            raise ValueError(
                f"the native LoRA adapts nn.Linear layers only; not Linear: {', '.join(bad[:5])}"
            )
        stray = sorted(set(inert_modules) - {p for p, _ in matched})
        if stray:
            raise ValueError(f"inert modules that are not targets of adapter {name!r}: {stray[:3]}")
        for path, module in matched:
            if not isinstance(module, LoraLinear):
                parent_path, _, child = path.rpartition(".")
                module = LoraLinear(module)
                setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
            module.add_adapter(name, spec, init=init)
        self.peft_config[name] = spec
        self.inert_modules[name] = frozenset(inert_modules)
        self.set_adapter(name, trainable=trainable)
        return [path for path, _ in matched]

    def set_adapter(self, name: str, *, trainable: bool = False) -> None:
        """Make ``name`` the active adapter; freeze everything but (with ``trainable``) its factors."""
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r} (have {sorted(self.peft_config)})")
        for param in self.parameters():
            param.requires_grad_(False)
        inert = self.inert_modules.get(name, frozenset())
        for path, layer in self.lora_layers():
            layer.active_adapters = [name] if name in layer.r and path not in inert else []
            if trainable and name in layer.r:
                layer.lora_A[name].weight.requires_grad_(True)
                layer.lora_B[name].weight.requires_grad_(True)
        self.active_adapter = name

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s factors under the names PEFT saves them
        (``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)); detached."""
        out = {}
        for path, layer in self.lora_layers():
            if name in layer.r:
                out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
                out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
        return out

    def load_adapter_state_dict(self, name: str, tensors: Mapping[str, Tensor], *, source: str) -> None:
        """Copy saved factors (PEFT's names, :meth:`adapter_state_dict`) into adapter ``name``.

        Raises:
            AdapterError: a tensor without a place in the model, a factor without a tensor, or a shape
                mismatch, naming ``source``.
        """
        own = self.adapter_state_dict(name)
        unexpected, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        if unexpected or missing:
            raise AdapterError(
                f"{source} does not match the model: {len(unexpected)} unexpected tensors {unexpected[:3]}, "
                f"{len(missing)} missing {missing[:3]}"
            )
        wrong = [
            f"{k} {tuple(tensors[k].shape)} (model {tuple(v.shape)})"
            for k, v in own.items()
            if v.shape != tensors[k].shape
        ]
        if wrong:
            raise AdapterError(f"{source}: {len(wrong)} tensors of the wrong shape, e.g. {wrong[0]}")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(tensors[key])

    def load_adapter(
        self, folder: str | os.PathLike[str], adapter_name: str, *, is_trainable: bool = False
    ) -> list[str]:
        """Add the adapter saved in ``folder`` (PEFT's files, ours or PEFT's) as ``adapter_name``.

        Returns:
            the adapted module paths.
        Raises:
            AdapterError: options the native LoRA does not implement, or a file that does not fit.
        """
        folder = Path(folder)
        config, tensors = read_adapter(folder)
        source = str(folder / ADAPTER_CONFIG_NAME)
        unsupported = unsupported_options(config)
        if unsupported:
            raise AdapterError(
                f"{source}: options the native LoRA does not implement: {', '.join(unsupported)}"
            )
        spec = LoraSpec.from_adapter_config(config, source=source)
        try:
            paths = self.add_adapter(adapter_name, spec, init=False, trainable=is_trainable)
        except ValueError as e:
            raise AdapterError(f"{source}: {e}") from None
        self.load_adapter_state_dict(adapter_name, tensors, source=str(folder / ADAPTER_WEIGHTS_NAME))
        return paths

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], selected_adapters: Sequence[str] | None = None
    ) -> None:
        """Write adapters in PEFT's layout: ``<save_directory>/<name>/`` (``default``: the directory itself),
        each with ``adapter_config.json`` and ``adapter_model.safetensors``. Not atomic (see the engine's
        ``save_adapter``)."""
        for name in selected_adapters if selected_adapters is not None else list(self.peft_config):
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            write_adapter(
                folder,
                peft_adapter_config(self.peft_config[name], self.get_base_model()),
                self.adapter_state_dict(name),
            )


def write_adapter(
    folder: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> Path:
    """Write ``adapter_config.json`` (PEFT's formatting: 2-space indent, sorted keys) and
    ``adapter_model.safetensors`` (``{"format": "pt"}`` metadata) into ``folder`` (created)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_NAME).write_text(
        json.dumps(dict(config), indent=2, sort_keys=True), encoding="utf-8"
    )
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(folder / ADAPTER_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    return folder


def check_adapter_folder(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``folder`` holds a PEFT LoRA adapter and return its ``adapter_config.json``.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        AdapterError: the config is not valid JSON or not a LoRA config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    for file_name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (folder / file_name).is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {file_name}")
    path = folder / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: not a PEFT LoRA config")
    return config


def read_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(adapter_config.json, tensors of adapter_model.safetensors)`` of an adapter folder (CPU tensors).

    Raises:
        FileNotFoundError: the folder or a file is missing.
        AdapterError: unreadable JSON or safetensors, or not a LoRA config (naming the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = check_adapter_folder(folder)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise AdapterError(
            f"{folder / ADAPTER_WEIGHTS_NAME}: not a readable safetensors file ({e})"
        ) from None
    return config, tensors


def read_training_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The adapter folder's ``semla_training.json`` (how it was trained), or None when it has none.

    Adapters of the original code, and of default-mode runs, have none. Reference-mode runs
    (``MODEL.LORA.REFERENCE_TRAINING``) write ``{"reference_training": true, ...}``.

    Raises:
        AdapterError: the file exists but is not a JSON object (naming it).
    """
    path = Path(folder) / TRAINING_RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise AdapterError(f"{path}: must hold a JSON object")
    return record


def _short(targets: str | Sequence[str]) -> str:
    if isinstance(targets, str):
        return repr(targets)
    return f"{list(targets)[:3]}{' ...' if len(targets) > 3 else ''} ({len(targets)})"
