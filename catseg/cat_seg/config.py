"""Configuration of CAT-Seg / SemLA runs: detectron2-style yacs trees, without detectron2.

The tree returned by :func:`get_cfg` holds every key the original code reads or the original YAML
files set, with the original's defaults: the subset of detectron2's ``get_cfg()`` that CAT-Seg
inherits, then :func:`add_deeplab_config`, :func:`add_cat_seg_config` and :func:`add_lora_config`,
in the order of the original SemLA code.

:func:`load_config` gives the semantics detectron2 users expect:

- a YAML file may name a ``_BASE_`` file, resolved relative to the including file; the chain is
  merged base first, then the file itself;
- ``KEY VALUE`` overrides follow (yacs ``merge_from_list``: string values go through
  ``ast.literal_eval``, so ``MODEL.SEM_SEG_HEAD.POOLING_SIZES [1,1]`` is a list of ints);
- unknown keys and wrong types raise :class:`ConfigError`, naming the full key and the file.

Deliberate differences from the original's behaviour (also listed in docs/differences.md):

- ``MODEL.LORA.ENABLED`` defaults to False (the original defaults to True, so a plain evaluation
  silently tries to load ``loradb/default``).
- ``MODEL.LORA.MODULES`` is accepted as an alias of the original's misspelt ``MODEL.LORA.MODUELS``
  in YAML files and overrides; the resolved tree only holds ``MODUELS``.
- ``MODEL.DEVICE`` defaults to ``"auto"`` (detectron2: ``"cuda"``): the device is picked at run time.
- Type checks are against the *default* value's type, and list/tuple elements are checked too
  (ints where the default holds ints, numbers where it holds floats, strings where it holds strings).
- A few values are validated (:func:`validate_config`): device, prompt-ensemble type, LoRA settings.

Paths inside configs (class JSONs such as ``datasets/cs19.json``) are relative to the ``catseg/``
folder, as in the original; :func:`resolve_catseg_path` turns them into absolute paths without
looking at the current directory.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode

logger = logging.getLogger(__name__)

__all__ = [
    "CATSEG_ROOT",
    "CfgNode",
    "ConfigError",
    "REFERENCE_LORA_TARGET_MODULES",
    "add_cat_seg_config",
    "add_deeplab_config",
    "add_lora_config",
    "config_to_dict",
    "dump_config",
    "get_cfg",
    "load_config",
    "lora_target_modules",
    "reference_lora_target_modules",
    "resolve_catseg_path",
    "validate_config",
]

#: The ``catseg/`` folder (holding ``configs/`` and ``datasets/``), found from this file, never the CWD.
CATSEG_ROOT: Path = Path(os.path.abspath(__file__)).parent.parent

# Leaf value types a yacs tree may hold (the same set yacs allows).
_VALID_TYPES: tuple[type, ...] = (tuple, list, str, int, float, bool, type(None))

# Alternative spellings accepted in YAML files and overrides: alias -> canonical key.
_KEY_ALIASES: dict[str, str] = {"MODEL.LORA.MODULES": "MODEL.LORA.MODUELS"}

# Element types of sequence keys whose default is empty (others are derived from the default).
_EMPTY_DEFAULT_ELEMENT_TYPES: dict[str, type] = {
    "DATASETS.TRAIN": str,
    "DATASETS.TEST": str,
    "DATASETS.SPECS": str,
    "MODEL.SAN.CLIP_DEEPER_FROZEN_EXCLUDE": str,
}

_PROMPT_ENSEMBLE_TYPES = ("single", "imagenet", "imagenet_select")
_LORA_BIAS_TYPES = ("none", "all", "lora_only")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value, bad file)."""


def reference_lora_target_modules(
    num_visual_layers: int = 24, num_text_layers: int = 12, num_aggregator_layers: int = 2
) -> tuple[str, ...]:
    """The original's ``MODEL.LORA.MODUELS``: every LoRA target of CAT-Seg (L), by full module path.

    Order: CLIP visual blocks, then CLIP text blocks (each attn q/k/v, then mlp c_fc/c_proj), then the
    aggregator layers (two swin blocks, each attn q/k/v/proj then mlp fc1/fc2, then the class
    attention q/k/v and its MLP.0/MLP.2). With the ViT-L/14 defaults this gives 214 names.

    Args:
        num_visual_layers: residual blocks of the CLIP image tower (24 for ViT-L/14).
        num_text_layers: residual blocks of the CLIP text tower (12).
        num_aggregator_layers: aggregator layers (``MODEL.SEM_SEG_HEAD.NUM_LAYERS`` of vitl_336, 2).
    Returns:
        The module paths, relative to the ``CATSeg`` model.
    """
    prefix = "sem_seg_head.predictor"
    names: list[str] = []
    for tower, depth in (
        ("clip_model.visual.transformer", num_visual_layers),
        ("clip_model.transformer", num_text_layers),
    ):
        for i in range(depth):
            block = f"{prefix}.{tower}.resblocks.{i}"
            names += [f"{block}.attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj")]
            names += [f"{block}.mlp.{fc}" for fc in ("c_fc", "c_proj")]
    for i in range(num_aggregator_layers):
        layer = f"{prefix}.transformer.layers.{i}"
        for block in ("block_1", "block_2"):
            names += [f"{layer}.swin_block.{block}.attn.{proj}" for proj in ("q", "k", "v", "proj")]
            names += [f"{layer}.swin_block.{block}.mlp.{fc}" for fc in ("fc1", "fc2")]
        names += [f"{layer}.attention.attention.{proj}" for proj in ("q", "k", "v")]
        names += [f"{layer}.attention.MLP.{idx}" for idx in ("0", "2")]
    return tuple(names)


#: The 214 LoRA target modules of the original SemLA code, the default of ``MODEL.LORA.MODUELS``.
REFERENCE_LORA_TARGET_MODULES: tuple[str, ...] = reference_lora_target_modules()


# --------------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------------


def _detectron2_defaults() -> CfgNode:
    """The part of detectron2's default config that the CAT-Seg code and YAML files rely on.

    Values are detectron2's, except ``MODEL.DEVICE`` ("auto" instead of "cuda").
    """
    cfg = CfgNode()
    cfg.VERSION = 2

    cfg.MODEL = CfgNode()
    cfg.MODEL.DEVICE = "auto"  # added default: "auto" picks cuda if available at run time, else cpu
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.WEIGHTS = ""
    # Stored in 0-255 BGR order by detectron2; CAT-Seg's YAMLs set RGB ImageNet values.
    cfg.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

    cfg.MODEL.SEM_SEG_HEAD = CfgNode()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 54
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 128
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 1.0

    cfg.INPUT = CfgNode()
    cfg.INPUT.MIN_SIZE_TRAIN = (800,)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.CROP = CfgNode()
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.CROP.TYPE = "relative_range"
    # Fractions for relative crops, pixels (ints) for "absolute". detectron2 writes the default as a list;
    # a tuple keeps the original YAMLs' "(384, 384)" a tuple (yacs converts either way).
    cfg.INPUT.CROP.SIZE = (0.9, 0.9)
    cfg.INPUT.FORMAT = "BGR"

    cfg.DATASETS = CfgNode()
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    # semla: domain spec files (cat_seg.data.domain_spec) whose datasets the run may name; relative paths
    # are taken from the current folder, then catseg/, and stored absolute.
    cfg.DATASETS.SPECS = []

    cfg.DATALOADER = CfgNode()
    cfg.DATALOADER.NUM_WORKERS = 4
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = True
    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.0
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

    cfg.SOLVER = CfgNode()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.MAX_ITER = 40000
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.BASE_LR_END = 0.0
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.NESTEROV = False
    cfg.SOLVER.WEIGHT_DECAY = 0.0001
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.STEPS = (30000,)
    cfg.SOLVER.NUM_DECAYS = 3
    cfg.SOLVER.WARMUP_FACTOR = 1.0 / 1000
    cfg.SOLVER.WARMUP_ITERS = 1000
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.RESCALE_INTERVAL = False
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0
    cfg.SOLVER.BIAS_LR_FACTOR = 1.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = None  # None: same as WEIGHT_DECAY
    cfg.SOLVER.CLIP_GRADIENTS = CfgNode()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.SOLVER.AMP = CfgNode()
    cfg.SOLVER.AMP.ENABLED = False

    cfg.TEST = CfgNode()
    cfg.TEST.EXPECTED_RESULTS = []
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.AUG = CfgNode()
    cfg.TEST.AUG.ENABLED = False
    cfg.TEST.AUG.MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
    cfg.TEST.AUG.MAX_SIZE = 4000
    cfg.TEST.AUG.FLIP = True
    cfg.TEST.PRECISE_BN = CfgNode()
    cfg.TEST.PRECISE_BN.ENABLED = False
    cfg.TEST.PRECISE_BN.NUM_ITER = 200

    cfg.OUTPUT_DIR = "./output"
    cfg.SEED = -1  # negative: a different seed per run
    cfg.CUDNN_BENCHMARK = False
    cfg.VIS_PERIOD = 0
    return cfg


def add_deeplab_config(cfg: CfgNode) -> None:
    """Add the DeepLab keys the original registers first; only the crop's area limit is used.

    Args:
        cfg: the tree to extend in place.
    """
    # Random crops are retried until no single category covers more than this fraction of the crop.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0


def add_cat_seg_config(cfg: CfgNode) -> None:
    """Add CAT-Seg's keys with the original code's defaults.

    Args:
        cfg: the tree to extend in place.
    """
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # -1: the train mapper does not pad
    cfg.DATASETS.VAL_ALL = ("coco_2017_val_all_stuff_sem_seg",)  # unused

    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_MULTIPLIER = 0.01

    cfg.MODEL.MASK_FORMER = CfgNode()
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32  # padding of the non-sliding inference path

    # Swin-T backbone keys; only read by the original's unused D2SwinTransformer backbone.
    cfg.MODEL.SWIN = CfgNode()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    head = cfg.MODEL.SEM_SEG_HEAD
    # Class-name JSONs, relative to catseg/ (resolve with resolve_catseg_path).
    head.TRAIN_CLASS_JSON = "datasets/ADE20K_2021_17_01/ADE20K_847.json"
    head.TEST_CLASS_JSON = "datasets/ADE20K_2021_17_01/ADE20K_847.json"
    head.TRAIN_CLASS_INDEXES = "datasets/coco/coco_stuff/split/seen_indexes.json"  # unused
    head.TEST_CLASS_INDEXES = "datasets/coco/coco_stuff/split/unseen_indexes.json"  # unused
    head.CLIP_PRETRAINED = "ViT-B/16"
    head.PROMPT_DEPTH = 0  # visual prompt tuning, disabled
    head.PROMPT_LENGTH = 0
    head.TEXT_GUIDANCE_DIM = 512
    head.TEXT_GUIDANCE_PROJ_DIM = 128
    head.APPEARANCE_GUIDANCE_DIM = 512
    head.APPEARANCE_GUIDANCE_PROJ_DIM = 128
    head.DECODER_DIMS = [64, 32]
    head.DECODER_GUIDANCE_DIMS = [256, 128]
    head.DECODER_GUIDANCE_PROJ_DIMS = [32, 16]
    head.NUM_LAYERS = 4
    head.NUM_HEADS = 4
    head.HIDDEN_DIMS = 128
    head.POOLING_SIZES = [6, 6]
    head.FEATURE_RESOLUTION = [24, 24]
    head.WINDOW_SIZES = 12
    head.ATTENTION_TYPE = "linear"
    head.CLIP_FINETUNE = "attention"

    cfg.MODEL.PROMPT_ENSEMBLE = False  # unused
    cfg.MODEL.PROMPT_ENSEMBLE_TYPE = "single"
    # CLIP input normalisation, in 0-255 RGB space.
    cfg.MODEL.CLIP_PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]
    cfg.MODEL.CLIP_PIXEL_STD = [68.5005327, 66.6321579, 70.3231630]

    cfg.TEST.SLIDING_WINDOW = False


def add_lora_config(cfg: CfgNode) -> None:
    """Add SemLA's ``MODEL.LORA`` keys, as the original SemLA code defines them.

    ``ENABLED`` defaults to False here (the original: True); ``MODUELS`` keeps the original's spelling
    and its 214 ViT-L module paths. ``REFERENCE_TRAINING`` is a semla addition (default False): True makes
    LoRA training reproduce the original trainer's two quirks (docs/differences.md#q1,
    docs/differences.md#q2): the LoRA on the CLIP attention ``q_proj``/``k_proj``/``v_proj`` is inert
    (kept in the adapter with its initial A and a zero B, never applied, never trained), and during
    training both decoder guidance features come from the first guidance block. Evaluation always uses
    the configured blocks.

    Args:
        cfg: the tree to extend in place.
    """
    cfg.MODEL.LORA = CfgNode()
    cfg.MODEL.LORA.ENABLED = False
    cfg.MODEL.LORA.DB_PATH = "loradb/"  # library root; the adapter lives in DB_PATH/NAME
    cfg.MODEL.LORA.NAME = "default"
    cfg.MODEL.LORA.MODUELS = list(REFERENCE_LORA_TARGET_MODULES)
    cfg.MODEL.LORA.RANK = 8
    cfg.MODEL.LORA.ALPHA = 16  # scaling = ALPHA / RANK = 2.0
    cfg.MODEL.LORA.DROPOUT = 0.0
    cfg.MODEL.LORA.USE_RSLORA = False
    cfg.MODEL.LORA.USE_DORA = False
    cfg.MODEL.LORA.BIAS = "none"
    cfg.MODEL.LORA.REFERENCE_TRAINING = False  # semla addition: the original trainer's behaviour (Q1, Q2)


def add_san_config(cfg: CfgNode) -> None:
    """Add SAN's ``MODEL.SAN`` and ``MODEL.SIDE_ADAPTER`` keys with the original SAN code's defaults (the
    ViT-B/16 model); read only when ``MODEL.META_ARCHITECTURE`` is ``"SAN"``.

    Args:
        cfg: the tree to extend in place.
    """
    san = cfg.MODEL.SAN = CfgNode()
    san.NO_OBJECT_WEIGHT = 0.1
    san.CLASS_WEIGHT = 2.0
    san.DICE_WEIGHT = 5.0
    san.MASK_WEIGHT = 5.0
    san.TRAIN_NUM_POINTS = 112 * 112
    san.NUM_CLASSES = 171  # sizes the checkpoint's criterion.empty_weight; the loss follows the vocabulary
    san.OVERSAMPLE_RATIO = 3.0
    san.IMPORTANCE_SAMPLE_RATIO = 0.75
    san.CLIP_MODEL_NAME = "ViT-B/16"
    san.CLIP_PRETRAINED_NAME = "openai"  # recorded only: the weights come from MODEL.WEIGHTS
    san.CLIP_TEMPLATE_SET = "vild"
    san.FEATURE_LAST_LAYER_IDX = 9
    san.CLIP_FROZEN_EXCLUDE = ["positional_embedding"]
    san.CLIP_DEEPER_FROZEN_EXCLUDE = []
    san.REC_CROSS_ATTN = False
    san.REC_DOWNSAMPLE_METHOD = "max"
    san.SOS_TOKEN_FORMAT = "cls_token"
    san.SIZE_DIVISIBILITY = 32
    san.ASYMETRIC_INPUT = True
    san.CLIP_RESOLUTION = 0.5
    san.SEM_SEG_POSTPROCESS_BEFORE_INFERENCE = True

    side = cfg.MODEL.SIDE_ADAPTER = CfgNode()
    side.NAME = "RegionwiseSideAdapterNetwork"
    side.VIT_NAME = "vit_w240n6d8_patch16"
    side.PRETRAINED = False
    side.IMAGE_SIZE = 640
    side.DROP_PATH_RATE = 0.0
    side.NUM_QUERIES = 100
    side.FUSION_TYPE = "add"
    side.FUSION_MAP = ["0->0", "3->1", "6->2", "9->3"]
    side.DEEP_SUPERVISION_IDXS = [7, 8]
    bias = side.ATTN_BIAS = CfgNode()
    bias.NUM_HEADS = 12
    bias.NUM_LAYERS = 1
    bias.EMBED_CHANNELS = 256
    bias.MLP_CHANNELS = 256
    bias.MLP_NUM_LAYERS = 3
    bias.RESCALE_ATTN_BIAS = True


def get_cfg() -> CfgNode:
    """A fresh, unfrozen default tree (detectron2 defaults + DeepLab + CAT-Seg + LoRA + SAN keys).

    Returns:
        The default config; callers may modify it.
    """
    cfg = _detectron2_defaults()
    add_deeplab_config(cfg)
    add_cat_seg_config(cfg)
    add_lora_config(cfg)
    add_san_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def resolve_catseg_path(path: str | os.PathLike[str]) -> Path:
    """Resolve a path written relative to ``catseg/`` (as in the original configs).

    Args:
        path: e.g. ``"datasets/cs19.json"``; absolute paths (and ``~``) are returned as they are.
    Returns:
        An absolute path; relative inputs are joined to :data:`CATSEG_ROOT`, never to the CWD.
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else CATSEG_ROOT / p


def find_input_path(path: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None) -> Path:
    """A command-line path that may also be written the original's way, relative to ``catseg/``.

    Args:
        path: as given on the command line.
        cwd: the caller's directory (default: the current one).
    Returns:
        ``path`` relative to ``cwd`` when that exists (or it is absolute), else relative to ``catseg/``
        (e.g. ``models/model_final.pth``, ``loradb``); absolute either way. The second may not exist:
        the caller reports a missing file with both places.
    """
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    here = Path(cwd if cwd is not None else os.getcwd()) / given
    return here if here.exists() else resolve_catseg_path(given)


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def _decode_value(value: Any) -> Any:
    """yacs's value decoding: strings are parsed as Python literals when they are ones."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _where(source: str | None) -> str:
    return f" in {source}" if source else " (command-line override)"


def _lookup(tree: CfgNode, full_key: str) -> Any:
    node: Any = tree
    for part in full_key.split("."):
        node = node[part]
    return node


def _unknown_key_error(tree: CfgNode, full_key: str, source: str | None) -> ConfigError:
    """Build the error for a key the schema does not have, with a spelling hint if one is close."""
    parts = full_key.split(".")
    node: Any = tree
    known: list[str] = []
    for depth, part in enumerate(parts):
        if not isinstance(node, CfgNode):
            parent = ".".join(parts[:depth])
            return ConfigError(
                f"Config key {parent!r} is a value, not a group: {full_key!r} does not exist{_where(source)}"
            )
        if part not in node:
            known = [".".join([*parts[:depth], k]) for k in node]
            break
        node = node[part]
    hint = difflib.get_close_matches(full_key, known, n=1)
    suffix = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"Unknown config key {full_key!r}{_where(source)}{suffix}")


def _element_type(full_key: str, default: Sequence[Any]) -> type | None:
    """The element type a sequence key holds: from its default, or the table for empty defaults."""
    if not default:
        return _EMPTY_DEFAULT_ELEMENT_TYPES.get(full_key)
    types = {type(item) for item in default}
    return types.pop() if len(types) == 1 else None


def _check_elements(value: Sequence[Any], elem_type: type, full_key: str, source: str | None) -> None:
    for item in value:
        if isinstance(item, bool) and elem_type is not bool:
            ok = False
        elif elem_type is float:
            ok = isinstance(item, (int, float))  # ints are fine where floats are (e.g. absolute crop sizes)
        else:
            ok = isinstance(item, elem_type)
        if not ok:
            raise ConfigError(
                f"Config key {full_key!r} holds {elem_type.__name__} items, got {item!r} "
                f"({type(item).__name__}) in {value!r}{_where(source)}"
            )


def _coerce(value: Any, default: Any, full_key: str, source: str | None) -> Any:
    """Check ``value`` against the default's type (yacs rules plus element checks) and coerce it.

    Same type: accepted. ``None`` on either side: accepted (yacs). list <-> tuple: converted to the
    default's type. Anything else raises.
    """
    if isinstance(value, Mapping) or not isinstance(value, _VALID_TYPES):
        raise ConfigError(
            f"Config key {full_key!r} got {value!r} of type {type(value).__name__}{_where(source)}; "
            f"a value must be one of {', '.join(t.__name__ for t in _VALID_TYPES)}"
        )
    if value is None or default is None:
        return value
    if type(value) is type(default):
        out = value
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        out = type(default)(value)
    else:
        raise ConfigError(
            f"Config key {full_key!r} expects {type(default).__name__} (default {default!r}), "
            f"got {type(value).__name__} {value!r}{_where(source)}"
        )
    if isinstance(out, (list, tuple)):
        elem_type = _element_type(full_key, default)
        if elem_type is not None:
            _check_elements(out, elem_type, full_key, source)
    return out


def _set_value(cfg: CfgNode, defaults: CfgNode, full_key: str, raw: Any, source: str | None) -> None:
    """Set one leaf of ``cfg`` from a raw (undecoded) value, checking the key and the type."""
    try:
        default = _lookup(defaults, full_key)
    except (KeyError, TypeError):
        raise _unknown_key_error(defaults, full_key, source) from None
    if isinstance(default, CfgNode):
        raise ConfigError(
            f"Config key {full_key!r} is a group of keys, not a value; got {raw!r}{_where(source)}"
        )
    value = _coerce(_decode_value(raw), default, full_key, source)
    parent_key, _, leaf = full_key.rpartition(".")
    parent = _lookup(cfg, parent_key) if parent_key else cfg
    parent[leaf] = value


def _flatten(mapping: Mapping[Any, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(full_key, value)`` for every leaf of a nested YAML mapping (aliases canonicalised).

    An empty mapping yields ``(key, {})`` so that its key is still checked.
    """
    for key, value in mapping.items():
        full_key = _KEY_ALIASES.get(f"{prefix}{key}", f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{full_key}.")
        else:
            yield full_key, value


def _merge_mapping(cfg: CfgNode, defaults: CfgNode, mapping: Mapping[Any, Any], source: str) -> None:
    seen: set[str] = set()
    for full_key, value in _flatten(mapping):
        if full_key in seen:
            aliases = [alias for alias, canonical in _KEY_ALIASES.items() if canonical == full_key]
            raise ConfigError(f"Config key {full_key!r} is set twice (through {aliases}) in {source}")
        seen.add(full_key)
        if isinstance(value, Mapping):  # empty group: only check that it is one
            try:
                node = _lookup(defaults, full_key)
            except (KeyError, TypeError):
                raise _unknown_key_error(defaults, full_key, source) from None
            if not isinstance(node, CfgNode):
                raise ConfigError(f"Config key {full_key!r} is a value, not a group of keys, in {source}")
            continue
        _set_value(cfg, defaults, full_key, value, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"Config file {path} has a non-string top-level key {key!r}")
    return data


def _collect_chain(path: Path, visiting: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """Read a config file and its ``_BASE_`` ancestors, base first.

    Args:
        path: an absolute path to a YAML file.
        visiting: resolved paths of the files that (transitively) include this one, for cycle detection.
    Returns:
        ``(path, mapping without _BASE_)`` pairs, the root-most base first.
    """
    identity = path.resolve()
    if identity in visiting:
        cycle = " -> ".join(str(p) for p in (*visiting, identity))
        raise ConfigError(f"_BASE_ cycle in config files: {cycle}")
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    data = _read_yaml(path)
    base = data.pop("_BASE_", None)
    chain: list[tuple[Path, dict[str, Any]]] = []
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"_BASE_ in {path} must be a file path, got {base!r}")
        base_path = Path(base).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path  # relative to the including file, never the CWD
        if not base_path.is_file():
            raise FileNotFoundError(
                f"_BASE_ {base!r} of {path} resolves to {base_path}, which does not exist"
            )
        chain = _collect_chain(base_path, (*visiting, identity))
    chain.append((path, data))
    return chain


def _apply_overrides(cfg: CfgNode, defaults: CfgNode, opts: Sequence[Any]) -> None:
    """Apply ``KEY VALUE`` pairs with yacs ``merge_from_list`` semantics."""
    if isinstance(opts, (str, bytes)):
        raise ConfigError(f"Overrides must be a sequence of KEY VALUE items, not a single string: {opts!r}")
    items = list(opts)
    if len(items) % 2:
        raise ConfigError(
            f"Overrides must be KEY VALUE pairs, got an odd number of items ({len(items)}): {items!r}"
        )
    for key, raw in zip(items[0::2], items[1::2]):
        if not isinstance(key, str) or not key:
            raise ConfigError(f"Override key must be a non-empty string, got {key!r}")
        _set_value(cfg, defaults, _KEY_ALIASES.get(key, key), raw, None)


def validate_config(cfg: CfgNode) -> None:
    """Check the few values whose range the schema knows (types are checked while merging).

    Args:
        cfg: a resolved config.
    Raises:
        ConfigError: naming the key and the value.
    """
    device = cfg.MODEL.DEVICE
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise ConfigError(f"MODEL.DEVICE must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {device!r}")
    ensemble = cfg.MODEL.PROMPT_ENSEMBLE_TYPE
    if ensemble not in _PROMPT_ENSEMBLE_TYPES:
        raise ConfigError(
            f"MODEL.PROMPT_ENSEMBLE_TYPE must be one of {_PROMPT_ENSEMBLE_TYPES}, got {ensemble!r}"
        )
    lora = cfg.MODEL.LORA
    if lora.RANK is None or lora.RANK <= 0:
        raise ConfigError(f"MODEL.LORA.RANK must be > 0, got {lora.RANK!r}")
    if lora.ALPHA is None or lora.ALPHA <= 0:
        raise ConfigError(f"MODEL.LORA.ALPHA must be > 0, got {lora.ALPHA!r}")
    if lora.DROPOUT is None or not 0.0 <= lora.DROPOUT < 1.0:
        raise ConfigError(f"MODEL.LORA.DROPOUT must be in [0, 1), got {lora.DROPOUT!r}")
    if lora.BIAS not in _LORA_BIAS_TYPES:
        raise ConfigError(f"MODEL.LORA.BIAS must be one of {_LORA_BIAS_TYPES}, got {lora.BIAS!r}")
    if cfg.TEST.AUG.ENABLED:  # the other TEST.AUG keys matter (and are checked) only when it is on
        from .test_time_augmentation import TTASettings

        try:
            TTASettings.from_cfg(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def load_config(
    config_file: str | os.PathLike[str] | None,
    opts: Sequence[Any] = (),
    *,
    overlays: Sequence[str | os.PathLike[str]] = (),
) -> CfgNode:
    """Build a resolved, frozen config: defaults <- ``_BASE_`` chain <- file <- overlays <- ``KEY VALUE`` overrides.

    Args:
        config_file: a YAML file, or None for the defaults alone. A relative path is taken as given
            (relative to the caller's CWD, like any command-line path); its ``_BASE_`` files are
            resolved relative to the file that names them. For original-style paths relative to
            ``catseg/`` use :func:`resolve_catseg_path` first.
        opts: flat ``[KEY, VALUE, KEY, VALUE, ...]`` overrides; string values are parsed with
            ``ast.literal_eval`` when they are Python literals (``"[1,1]"``, ``"20"``, ``"True"``).
            ``MODEL.LORA.MODULES`` is accepted for ``MODEL.LORA.MODUELS``.
        overlays: more YAML files (each with its own ``_BASE_`` chain) merged on top of ``config_file``
            before the overrides, in order; they set only the keys they contain (e.g. the model
            architecture of every domain config of an experiment).
    Returns:
        The frozen config (``cfg.clone()`` then ``cfg.defrost()`` to modify a copy).
    Raises:
        ConfigError: unknown key, wrong type, invalid value, malformed YAML, ``_BASE_`` cycle, or an
            odd number of overrides; the message names the full key and, for files, the file.
        FileNotFoundError: the file or one of its ``_BASE_`` files does not exist.
    """
    from .data.domain_spec import is_domain_spec_file, spec_config_opts
    from .data.registry import register_domain_spec_file

    defaults = get_cfg()
    cfg = defaults.clone()
    if config_file is not None and is_domain_spec_file(Path(config_file).expanduser()):
        spec = register_domain_spec_file(Path(config_file).expanduser())
        logger.info("%s is the domain spec of %r; its base config is %s", config_file, spec.name, spec.config)
        config_file, opts = spec.config, [*spec_config_opts(spec), *opts]
    files = ([] if config_file is None else [config_file]) + list(overlays)
    for file in files:
        for file_path, mapping in _collect_chain(Path(file).expanduser().absolute()):
            logger.debug("Merging config file %s", file_path)
            _merge_mapping(cfg, defaults, mapping, str(file_path))
    _apply_overrides(cfg, defaults, opts)
    specs = []
    for given in cfg.DATASETS.SPECS:
        path = find_input_path(given)
        if not path.is_file():
            raise ConfigError(f"DATASETS.SPECS names {given}, which is not a file (looked at {path})")
        register_domain_spec_file(path)
        specs.append(str(path))
    cfg.DATASETS.SPECS = specs
    validate_config(cfg)
    cfg.freeze()
    return cfg


def lora_target_modules(cfg: CfgNode) -> list[str]:
    """The LoRA target module names of a config (``MODEL.LORA.MODUELS``), checked.

    An empty list means "the original's selection for whatever model is built" (CLIP q/k/v/c_fc/c_proj
    of both towers and the aggregator's Linear layers); :func:`cat_seg.lora.resolve_target_modules`
    expands it for a given model (the tiny configs use this).

    Args:
        cfg: a resolved config.
    Returns:
        A new list of the names, in config order (empty: derive from the model).
    Raises:
        ConfigError: the list holds a non-string or empty name, or repeats a name.
    """
    names = list(cfg.MODEL.LORA.MODUELS)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise ConfigError(f"MODEL.LORA.MODUELS holds invalid module names: {bad!r}")
    dupes = sorted({name for name in names if names.count(name) > 1})
    if dupes:
        raise ConfigError(f"MODEL.LORA.MODUELS repeats module names: {dupes!r}")
    return names


# --------------------------------------------------------------------------------------------------
# Dumping
# --------------------------------------------------------------------------------------------------


def _to_yaml_value(value: Any) -> Any:
    """Encode a leaf so that ``load_config`` decodes it back to the same value and type.

    Tuples are written as Python literals (``"(384,)"``, the original YAML style) and strings that
    would otherwise be parsed as literals (``"2024"``, ``"True"``) as quoted Python strings.
    """
    if isinstance(value, tuple):
        return repr(value)
    if isinstance(value, str):
        decoded = _decode_value(value)
        if type(decoded) is not str or decoded != value:
            return repr(value)
    if isinstance(value, list):
        return list(value)
    return value


def config_to_dict(cfg: CfgNode) -> dict[str, Any]:
    """Plain nested dicts of a config, encoded for YAML (see :func:`dump_config`).

    Args:
        cfg: any config tree.
    Returns:
        Nested ``dict`` of YAML-safe values, in the tree's key order.
    """
    return {
        key: config_to_dict(value) if isinstance(value, CfgNode) else _to_yaml_value(value)
        for key, value in cfg.items()
    }


def dump_config(cfg: CfgNode, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically (temporary file in the same folder, then rename).

    ``load_config(path)`` gives back a tree equal to ``cfg``.

    Args:
        cfg: the resolved config.
        path: the YAML file to write; missing parent folders are created.
    Returns:
        The path written.
    """
    from .fileio import atomic_write_text

    path = Path(path).expanduser()
    text = "# Fully resolved config (semla cat_seg.config.dump_config); load with load_config().\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    atomic_write_text(path, text)
    logger.info("Wrote resolved config to %s", path)
    return path
