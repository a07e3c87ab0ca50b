"""Attach, save and load LoRA adapters on a CAT-Seg model (SemLA's ``loradb/<name>/``).

An adapter is stored the way the original stores it (PEFT ``save_pretrained``)::

    <DB_PATH>/<NAME>/adapter_config.json          LoraConfig: r, lora_alpha, target_modules, ...
    <DB_PATH>/<NAME>/adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in)
                                                  base_model.model.<module>.lora_B.weight (out, r)

The LoRA layers are the project's own (:mod:`cat_seg.lora`): PEFT's module layout, parameter names,
initialisation and files, without importing ``peft`` (which imports ``transformers``: 10-15 s of start-up
that every ``run_lora.sh`` / ``eval_lora.sh`` used to pay). Settings the native LoRA does not implement
(``MODEL.LORA.USE_DORA True``, ``MODEL.LORA.BIAS`` other than ``"none"``, and adapters whose
``adapter_config.json`` asks for such options) are handed to PEFT, imported only then; the functions
return either kind of model, with the same interface (``get_base_model``, ``peft_config``,
``save_pretrained``, PEFT's parameter names).

Differences from the original (deliberate):

- :func:`save_adapter` writes into a temporary folder inside ``DB_PATH`` and renames the finished
  ``<NAME>/`` into place, so an interrupted save never leaves a half-written adapter, and it refuses to
  replace an existing adapter unless asked to. PEFT's model card (``README.md``), which the original
  leaves at the library root, is not written.
- ``target_modules`` in ``adapter_config.json`` is the full list of module paths, in config order, as
  the original's PEFT 0.10 wrote it (newer PEFT would shorten lists of 20+ names to suffixes).
- Because our CLIP attention calls its ``q_proj``/``k_proj``/``v_proj`` Linear modules, LoRA on them
  trains and takes effect (in the original SemLA code they are inert). ``MODEL.LORA.REFERENCE_TRAINING
  True`` restores the original: those targets keep the adapter (same tensor names and shapes in the file)
  but never apply it, so their B stays zero; the run records the mode in ``semla_training.json`` beside
  the adapter's PEFT files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from ..config import lora_target_modules
from ..lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TRAINING_RECORD_NAME,
    AdapterError,
    LoraModel,
    LoraSpec,
    check_adapter_folder,
    clip_attention_projections,
    peft_adapter_config,
    resolve_target_modules,
    unsupported_options,
)
from .io import default_file_mode, umask

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

#: What :func:`attach_lora` / :func:`load_adapter` return: the native model, or PEFT's for the options
#: only PEFT implements.
AdaptedModel = Union[LoraModel, "PeftModel"]

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdaptedModel",
    "AdapterError",
    "check_adapter_targets",
    "adapter_dir",
    "attach_lora",
    "check_adapter_folder",
    "load_adapter",
    "lora_config_from_cfg",
    "lora_spec_from_cfg",
    "lora_state_dict",
    "save_adapter",
    "state_digest",
    "trainable_state_dict",
    "validate_adapter_name",
]

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def validate_adapter_name(name: str) -> str:
    """Check ``MODEL.LORA.NAME``: letters, digits, ``_`` and ``-`` (it becomes a folder and a PEFT key).

    Raises:
        AdapterError: naming the value.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise AdapterError(
            f"MODEL.LORA.NAME must be letters, digits, '_' or '-' (it names the folder DB_PATH/NAME and "
            f"the PEFT adapter), got {name!r}"
        )
    return name


def adapter_dir(db_path: str | os.PathLike[str], name: str) -> Path:
    """``<db_path>/<name>``, the folder of one adapter (no trailing-slash rules, unlike the original)."""
    return Path(db_path) / validate_adapter_name(name)


def check_adapter_targets(folder: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """Read an adapter's config and check that its (full-path) target modules exist in ``model``.

    Returns:
        the adapter config.
    Raises:
        AdapterError: invalid config, or targets the model does not have (naming the config file).
    """
    folder = Path(folder)
    config = check_adapter_folder(folder)
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets and all("." in t for t in targets):
        try:
            resolve_target_modules(targets, model)
        except ValueError as e:
            raise AdapterError(f"{folder / ADAPTER_CONFIG_NAME}: {e}") from None
    return config


def lora_spec_from_cfg(cfg: Any, target_modules: list[str]) -> LoraSpec:
    """The native adapter settings from ``MODEL.LORA`` (r, alpha, dropout, rsLoRA) and the targets."""
    lora = cfg.MODEL.LORA
    return LoraSpec(
        r=int(lora.RANK),
        lora_alpha=lora.ALPHA,
        target_modules=tuple(target_modules),
        lora_dropout=float(lora.DROPOUT),
        use_rslora=bool(lora.USE_RSLORA),
    )


def _cfg_adapter_config(cfg: Any, target_modules: list[str], model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` a run of ``cfg`` writes (PEFT's fields)."""
    lora = cfg.MODEL.LORA
    return peft_adapter_config(
        lora_spec_from_cfg(cfg, target_modules), model, bias=lora.BIAS, use_dora=bool(lora.USE_DORA)
    )


def lora_config_from_cfg(cfg: Any, target_modules: list[str]) -> LoraConfig:
    """PEFT ``LoraConfig`` from ``MODEL.LORA`` (r, alpha, dropout, bias, rsLoRA, DoRA) and the targets.

    Imports ``peft``; used for the settings the native LoRA does not implement, and by tests.
    """
    from peft import LoraConfig

    lora = cfg.MODEL.LORA
    return LoraConfig(
        r=int(lora.RANK),
        lora_alpha=lora.ALPHA,
        lora_dropout=float(lora.DROPOUT),
        bias=lora.BIAS,
        use_rslora=bool(lora.USE_RSLORA),
        use_dora=bool(lora.USE_DORA),
        target_modules=list(target_modules),
    )


def attach_lora(model: nn.Module, cfg: Any) -> AdaptedModel:
    """Wrap ``model`` with a new, trainable adapter ``MODEL.LORA.NAME``.

    The targets are ``MODEL.LORA.MODUELS`` checked against the model (an empty list selects the
    original's modules for this preset). Every other parameter is frozen, so only the LoRA factors
    train (their count and size are logged; the names at DEBUG level). LoRA A is Kaiming-initialised
    from the torch RNG exactly as PEFT draws it and B is zero, so the new model computes what
    ``model`` did.

    The native :class:`~cat_seg.lora.LoraModel` is used, unless ``MODEL.LORA.USE_DORA`` is True or
    ``MODEL.LORA.BIAS`` is not ``"none"``: PEFT's ``get_peft_model`` then (``peft`` is imported only
    in that case).

    With ``MODEL.LORA.REFERENCE_TRAINING`` the model is prepared as the original trainer had it
    (docs/differences.md#q1, docs/differences.md#q2): the targets on the CLIP attention q/k/v projections
    are inert (:meth:`~cat_seg.lora.LoraModel.add_adapter`: they hold the adapter, initialised and
    "trainable" as in the original, but never apply it, so they get no gradient and B stays zero), and in
    training mode both decoder guidance features come from the first guidance block
    (``CATSeg.train_guidance_layers``); in eval mode the model uses its configured blocks.

    Args:
        model: a ``CATSeg`` with its base weights loaded (modified in place: LoRA layers are injected).
        cfg: a resolved config.
    Returns:
        the adapted model (``get_base_model()`` is ``model``).
    Raises:
        ValueError: unknown target modules (naming them), a bad adapter name, or reference training
            with options only PEFT implements.
    """
    name = validate_adapter_name(cfg.MODEL.LORA.NAME)
    targets = resolve_target_modules(lora_target_modules(cfg), model)
    peft_only = unsupported_options(_cfg_adapter_config(cfg, targets, model))
    reference = bool(cfg.MODEL.LORA.REFERENCE_TRAINING)
    if reference and not hasattr(model, "train_guidance_layers"):
        raise ValueError(
            f"MODEL.LORA.REFERENCE_TRAINING True reproduces the original CAT-Seg SemLA trainer; it does not "
            f"apply to {type(model).__name__} (MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r})"
        )
    if reference and peft_only:
        raise ValueError(
            f"MODEL.LORA.REFERENCE_TRAINING True needs the native LoRA, which does not implement "
            f"{', '.join(peft_only)} (the original trainer used neither)"
        )
    if peft_only:
        from peft import get_peft_model

        logger.info("LoRA options %s: the adapter is built by PEFT", ", ".join(peft_only))
        adapted: AdaptedModel = get_peft_model(model, lora_config_from_cfg(cfg, targets), adapter_name=name)
        # PEFT >= 0.13 may replace a long target list by suffixes in the live config; keep the exact
        # paths, which is what gets saved to adapter_config.json (as the original's PEFT 0.10 did).
        adapted.peft_config[name].target_modules = list(targets)
    else:
        adapted = LoraModel(model)
        inert = clip_attention_projections(targets) if reference else []
        adapted.add_adapter(name, lora_spec_from_cfg(cfg, targets), inert_modules=inert)
        if reference:
            first = model.guidance_layers[0]
            model.train_guidance_layers = (first, first)
            logger.info(
                "MODEL.LORA.REFERENCE_TRAINING, as in the original trainer: the LoRA on %d CLIP attention "
                "q/k/v projections is inert (kept in the adapter, never applied, B stays zero); during "
                "training both guidance features come from CLIP block %d (evaluation: blocks %s)",
                len(inert),
                first,
                model.guidance_layers,
            )
    trainable = trainable_state_dict(adapted)
    logger.info(
        "LoRA adapter %r: r=%s alpha=%s on %d modules; %d trainable tensors, %s values",
        name,
        cfg.MODEL.LORA.RANK,
        cfg.MODEL.LORA.ALPHA,
        len(targets),
        len(trainable),
        f"{sum(t.numel() for t in trainable.values()):,}",
    )
    for param_name in trainable:
        logger.debug("trainable: %s", param_name)
    return adapted


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` of the parameters with ``requires_grad`` (detached, not copied), in model order."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def lora_state_dict(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """The LoRA tensors of one adapter of an adapted model, by parameter name (detached, not copied).

    Names look like ``base_model.model.<module>.lora_A.<adapter_name>.weight``.
    """
    pattern = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(adapter_name)}(\.|$)")
    return {name: p.detach() for name, p in model.named_parameters() if pattern.search(name)}


def state_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in sorted name order).

    Equal digests mean bit-identical tensors; used to show that DDP ranks hold the same weights.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(
    model: AdaptedModel,
    db_path: str | os.PathLike[str],
    name: str,
    *,
    overwrite: bool = False,
    training_record: Mapping[str, Any] | None = None,
) -> Path:
    """Save adapter ``name`` to ``<db_path>/<name>/`` in PEFT's format, atomically.

    The model's ``save_pretrained`` (native or PEFT's) writes into a temporary folder inside
    ``db_path``; the finished ``<name>/`` folder is then renamed into place. An existing adapter folder
    is replaced only with ``overwrite`` (it is moved aside first and restored if the final rename fails).

    Args:
        model: the adapted model holding the adapter (not a DistributedDataParallel wrapper).
        db_path: the adapter library root (created if needed).
        name: the adapter name.
        overwrite: replace an existing ``<db_path>/<name>``.
        training_record: written as ``semla_training.json`` into the adapter folder when given (how the
            adapter was trained; PEFT ignores the file).
    Returns:
        the adapter folder.
    Raises:
        FileExistsError: the folder exists and ``overwrite`` is False.
    """
    final = adapter_dir(db_path, name)
    if final.exists() and not overwrite:
        raise FileExistsError(f"adapter folder {final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.saving.", dir=final.parent))
    try:
        model.save_pretrained(str(tmp / "out"), selected_adapters=[name])
        staged = tmp / "out" / name
        if name == "default":  # PEFT writes the default adapter into the folder itself
            staged = tmp / "staged"
            staged.mkdir()
            for file_name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
                os.replace(tmp / "out" / file_name, staged / file_name)
        check_adapter_folder(staged)
        if training_record is not None:
            (staged / TRAINING_RECORD_NAME).write_text(json.dumps(dict(training_record), indent=2) + "\n")
        for file in staged.iterdir():  # PEFT/safetensors may create private (0o600) files
            file.chmod(default_file_mode())
        staged.chmod(0o777 & ~umask())
        previous = tmp / "previous"
        if final.exists():
            os.replace(final, previous)
        try:
            os.replace(staged, final)
        except BaseException:
            if previous.exists():
                os.replace(previous, final)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved LoRA adapter %r to %s", name, final)
    return final


def load_adapter(model: nn.Module, db_path: str | os.PathLike[str], name: str) -> AdaptedModel:
    """Attach the saved adapter ``<db_path>/<name>`` (PEFT's files) to ``model``, checked.

    Every tensor of the file must land on a LoRA parameter of the model and every LoRA parameter of
    the adapter must come from the file; otherwise an error names the file and the keys. The native
    LoRA loads it, unless its ``adapter_config.json`` asks for options only PEFT implements (DoRA,
    trained biases, rank patterns, ...): PEFT's ``PeftModel.from_pretrained`` then.

    Args:
        model: a ``CATSeg`` with its base weights (the LoRA layers are injected into it in place).
        db_path: the adapter library root.
        name: the adapter name (sub-folder and adapter name).
    Returns:
        the adapted model in inference mode (nothing trainable, ``eval()``), with ``name`` active.
    Raises:
        FileNotFoundError: the adapter folder or one of its files is missing.
        AdapterError: the file and the model do not match.
    """
    folder = adapter_dir(db_path, name)
    config = check_adapter_targets(folder, model)
    peft_only = unsupported_options(config)
    if not peft_only:
        adapted = LoraModel(model)
        adapted.load_adapter(folder, name)
        adapted.eval()
        logger.info(
            "loaded LoRA adapter %r from %s (%d tensors)", name, folder, len(adapted.adapter_state_dict(name))
        )
        return adapted

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    logger.info("LoRA options %s in %s: the adapter is loaded by PEFT", ", ".join(peft_only), folder)
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    saved = set(load_file(str(folder / ADAPTER_WEIGHTS_NAME)))
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=name))  # the keys PEFT would save
    unexpected, missing = sorted(saved - expected), sorted(expected - saved)
    if unexpected or missing:
        raise AdapterError(
            f"{folder / ADAPTER_WEIGHTS_NAME} does not match the model: {len(unexpected)} unexpected tensors "
            f"{unexpected[:3]}, {len(missing)} missing {missing[:3]}"
        )
    logger.info("loaded LoRA adapter %r from %s (%d tensors)", name, folder, len(saved))
    return peft_model
