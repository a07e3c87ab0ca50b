"""Tests of ``cat_seg.config``: defaults, ``_BASE_`` chains, overrides, strictness, dumping, data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cat_seg.config import (
    CATSEG_ROOT,
    REFERENCE_LORA_TARGET_MODULES,
    ConfigError,
    dump_config,
    get_cfg,
    load_config,
    lora_target_modules,
    resolve_catseg_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CATSEG_ROOT / "configs"
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def _fixtures_dir() -> Path | None:
    """The shared compatibility fixtures, when this checkout can see them (they live outside the repo)."""
    for candidate in (REPO_ROOT / "shared" / "fixtures", REPO_ROOT.parent / "shared" / "fixtures"):
        if candidate.is_dir():
            return candidate
    return None


FIXTURES = _fixtures_dir()
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="shared fixtures not available")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------------


def test_defaults_detectron2_and_cat_seg() -> None:
    cfg = get_cfg()
    assert not cfg.is_frozen()
    # detectron2 defaults the reference inherits
    assert cfg.MODEL.PIXEL_MEAN == [103.530, 116.280, 123.675]
    assert cfg.INPUT.MIN_SIZE_TEST == 800 and cfg.INPUT.MAX_SIZE_TEST == 1333
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,)
    assert cfg.INPUT.FORMAT == "BGR"
    assert cfg.SOLVER.MOMENTUM == 0.9 and cfg.SOLVER.WEIGHT_DECAY == 0.0001
    assert cfg.SOLVER.WARMUP_FACTOR == 0.001 and cfg.SOLVER.WARMUP_ITERS == 1000
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 5000 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.MAX_ITER == 40000 and cfg.SOLVER.BASE_LR_END == 0.0
    assert cfg.SOLVER.WEIGHT_DECAY_BIAS is None
    assert dict(cfg.SOLVER.CLIP_GRADIENTS) == {
        "ENABLED": False,
        "CLIP_TYPE": "value",
        "CLIP_VALUE": 1.0,
        "NORM_TYPE": 2.0,
    }
    assert cfg.SOLVER.AMP.ENABLED is False
    assert cfg.TEST.EVAL_PERIOD == 0 and cfg.TEST.AUG.ENABLED is False
    assert cfg.DATALOADER.NUM_WORKERS == 4 and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is True
    assert cfg.DATASETS.TRAIN == () and cfg.DATASETS.TEST == ()
    assert (cfg.OUTPUT_DIR, cfg.SEED, cfg.CUDNN_BENCHMARK, cfg.VERSION) == ("./output", -1, False, 2)
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.DEVICE == "auto"
    # DeepLab keys
    assert cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 1.0
    assert cfg.SOLVER.POLY_LR_POWER == 0.9 and cfg.SOLVER.POLY_LR_CONSTANT_ENDING == 0.0
    # CAT-Seg code defaults (as in the original SemLA code)
    head = cfg.MODEL.SEM_SEG_HEAD
    assert head.CLIP_PRETRAINED == "ViT-B/16"
    assert (head.NUM_LAYERS, head.NUM_HEADS, head.HIDDEN_DIMS) == (4, 4, 128)
    assert head.POOLING_SIZES == [6, 6] and head.FEATURE_RESOLUTION == [24, 24]
    assert head.TEXT_GUIDANCE_DIM == 512 and head.APPEARANCE_GUIDANCE_DIM == 512
    assert (head.ATTENTION_TYPE, head.CLIP_FINETUNE) == ("linear", "attention")
    assert cfg.MODEL.PROMPT_ENSEMBLE_TYPE == "single"
    assert cfg.MODEL.CLIP_PIXEL_STD == [68.5005327, 66.6321579, 70.3231630]
    assert cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY == 32
    assert cfg.TEST.SLIDING_WINDOW is False
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic" and cfg.INPUT.COLOR_AUG_SSD is False
    assert cfg.SOLVER.CLIP_MULTIPLIER == 0.01 and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    # LoRA keys
    lora = cfg.MODEL.LORA
    assert lora.ENABLED is False  # deliberate: the reference defaults to True
    assert (lora.DB_PATH, lora.NAME) == ("loradb/", "default")
    assert (lora.RANK, lora.ALPHA, lora.DROPOUT) == (8, 16, 0.0)
    assert (lora.USE_RSLORA, lora.USE_DORA, lora.BIAS) == (False, False, "none")
    assert "MODULES" not in lora


def test_get_cfg_returns_independent_trees() -> None:
    a, b = get_cfg(), get_cfg()
    a.MODEL.LORA.MODUELS.append("x")
    a.SOLVER.MAX_ITER = 1
    assert len(b.MODEL.LORA.MODUELS) == 214 and b.SOLVER.MAX_ITER == 40000


def test_load_config_none_gives_frozen_defaults() -> None:
    cfg = load_config(None)
    assert cfg.is_frozen()
    assert cfg == get_cfg()


# --------------------------------------------------------------------------------------------------
# LoRA target list
# --------------------------------------------------------------------------------------------------


def test_lora_modules_default_structure() -> None:
    names = get_cfg().MODEL.LORA.MODUELS
    assert len(names) == 214 and len(set(names)) == 214
    assert names == list(REFERENCE_LORA_TARGET_MODULES)
    assert all(n.startswith("sem_seg_head.predictor.") for n in names)
    visual = [n for n in names if ".clip_model.visual." in n]
    text = [n for n in names if ".clip_model.transformer." in n]
    aggregator = [n for n in names if ".predictor.transformer.layers." in n]
    assert (len(visual), len(text), len(aggregator)) == (120, 60, 34)
    # natural order: visual, text, aggregator; q/k/v then c_fc/c_proj inside a block
    assert names[:5] == [
        f"sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.{s}"
        for s in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert names[119].endswith("visual.transformer.resblocks.23.mlp.c_proj")
    assert names[120] == "sem_seg_head.predictor.clip_model.transformer.resblocks.0.attn.q_proj"
    assert names[-1] == "sem_seg_head.predictor.transformer.layers.1.attention.MLP.2"
    assert not any("out_proj" in n for n in names)


def test_lora_modules_match_released_adapter() -> None:
    data = json.loads((REPO_ROOT / "tests" / "fixtures" / "semla_lora_adapter_keys.json").read_text())
    from_config = data["adapter_config_json"]["target_modules"]
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    from_tensors = {k[len(prefix) : -len(suffix)] for k in data["adapter_tensors"] if k.endswith(suffix)}
    names = get_cfg().MODEL.LORA.MODUELS
    assert set(names) == set(from_config) == from_tensors
    assert len(names) == len(from_config) == 214


def test_lora_target_modules_helper() -> None:
    cfg = load_config(None, ["MODEL.LORA.MODULES", "['a.q', 'a.v']"])
    assert lora_target_modules(cfg) == ["a.q", "a.v"]
    assert lora_target_modules(get_cfg()) == list(REFERENCE_LORA_TARGET_MODULES)
    assert lora_target_modules(load_config(None, ["MODEL.LORA.MODUELS", "[]"])) == []  # derive from model
    with pytest.raises(ConfigError, match="repeats"):
        lora_target_modules(load_config(None, ["MODEL.LORA.MODUELS", "['a', 'a']"]))


# --------------------------------------------------------------------------------------------------
# _BASE_ chains of the reference tree
# --------------------------------------------------------------------------------------------------


def test_acdc_rain_chain_resolves_like_reference() -> None:
    cfg = load_config(CONFIGS / "acdc" / "rain" / "lora-rain-acdc.yaml")
    assert cfg.is_frozen()
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.MAX_ITER == 2000
    assert cfg.SOLVER.CLIP_MULTIPLIER == 1.0 and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.0
    assert cfg.SOLVER.WARMUP_FACTOR == 0.01 and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR"
    assert cfg.INPUT.MIN_SIZE_TEST == 1080 and cfg.INPUT.MAX_SIZE_TEST == 1920
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_LAYERS == 2  # vitl_336
    assert cfg.MODEL.SEM_SEG_HEAD.POOLING_SIZES == [2, 2]
    assert cfg.MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED == "ViT-L/14@336px"
    assert cfg.INPUT.COLOR_AUG_SSD is True  # config.yaml, never overridden
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED is True and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.01
    assert cfg.SEED == 250 and cfg.MODEL.PROMPT_ENSEMBLE_TYPE == "single"
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
    assert cfg.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON == "datasets/cs19.json"
    assert cfg.DATASETS.TRAIN == ("acdc-rain_sem_seg_train",)
    assert cfg.DATASETS.TEST == ("acdc-rain_sem_seg_val",)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (384,) and cfg.INPUT.CROP.SIZE == (384, 384)
    assert cfg.TEST.EVAL_PERIOD == 500000 and cfg.CUDNN_BENCHMARK is True
    assert cfg.MODEL.LORA.ENABLED is False


def test_a150_inherits_base_max_iter() -> None:
    cfg = load_config(CONFIGS / "a150" / "a150.yaml")
    assert cfg.SOLVER.MAX_ITER == 20000 and cfg.SEED == 1000
    assert cfg.INPUT.MIN_SIZE_TEST == 0 and cfg.INPUT.MAX_SIZE_TEST == 700
    assert cfg.SOLVER.WEIGHT_DECAY == 1e-5 and cfg.SOLVER.WARMUP_FACTOR == 0.1


def test_mv_ignore_value_and_muses_fixed_file() -> None:
    assert load_config(CONFIGS / "mv" / "mv.yaml").MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 65
    fft = load_config(CONFIGS / "muses" / "multidomain_fft.yaml")  # '-_BASE_' typo fixed
    assert fft.SOLVER.BASE_LR == 1e-5 and fft.SOLVER.MAX_ITER == 3000
    assert len(fft.DATASETS.TRAIN) == 8


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.is_frozen()


def test_config_tree_mirrors_reference() -> None:
    names = {str(p.relative_to(CONFIGS)) for p in ALL_YAMLS}
    # the reference's 47 files plus tiny/tiny{,_model,_a150}.yaml, own_domain.yaml and SAN's four
    assert len(names) == 47 + 4 + 4
    assert {"tiny/tiny.yaml", "tiny/tiny_model.yaml", "tiny/tiny_a150.yaml", "acdc/acdc_base.yaml"} <= names
    san = {"san/san_vitb16.yaml", "san/san_vitl14_336.yaml", "san/san_tiny_model.yaml", "san/san_tiny.yaml"}
    assert san <= names
    assert "own_domain.yaml" in names


@needs_fixtures
def test_reference_yaml_values_kept() -> None:
    """Each copied file holds the reference's values (only comments differ, or a documented fix)."""
    ref_root = FIXTURES / "reference_data" / "configs"
    for ref in sorted(ref_root.rglob("*.yaml")):
        rel = ref.relative_to(ref_root)
        ours = yaml.safe_load((CONFIGS / rel).read_text())
        theirs = yaml.safe_load(ref.read_text())
        if str(rel) == "muses/multidomain_fft.yaml":
            theirs["_BASE_"] = theirs.pop("-_BASE_")
        elif str(rel) == "test_blip.yaml":
            del theirs["SAVE_NAME"], theirs["DEVICE"]
        assert ours == theirs, rel


def test_tiny_config_values() -> None:
    cfg = load_config(CONFIGS / "tiny" / "tiny.yaml")
    head = cfg.MODEL.SEM_SEG_HEAD
    assert cfg.MODEL.META_ARCHITECTURE == "CATSeg" and cfg.MODEL.DEVICE == "cpu"
    assert head.CLIP_PRETRAINED == "tiny"
    assert (head.TEXT_GUIDANCE_DIM, head.TEXT_GUIDANCE_PROJ_DIM) == (32, 16)
    assert (head.APPEARANCE_GUIDANCE_DIM, head.APPEARANCE_GUIDANCE_PROJ_DIM) == (32, 16)
    assert head.DECODER_DIMS == [32, 16] and head.DECODER_GUIDANCE_DIMS == [32, 16]
    assert head.DECODER_GUIDANCE_PROJ_DIMS == [16, 8]
    assert (head.NUM_LAYERS, head.NUM_HEADS, head.HIDDEN_DIMS, head.WINDOW_SIZES) == (2, 2, 32, 2)
    assert head.POOLING_SIZES == [2, 2] and head.FEATURE_RESOLUTION == [4, 4]
    assert (head.ATTENTION_TYPE, head.CLIP_FINETUNE) == ("linear", "attention")
    assert cfg.MODEL.PROMPT_ENSEMBLE_TYPE == "single"
    assert head.TRAIN_CLASS_JSON == head.TEST_CLASS_JSON == "datasets/cs19.json" and head.NUM_CLASSES == 19
    assert cfg.INPUT.MIN_SIZE_TRAIN == (32,) and cfg.INPUT.MAX_SIZE_TRAIN == 128
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (48, 96)
    assert cfg.INPUT.CROP.SIZE == (32, 32) and cfg.INPUT.SIZE_DIVISIBILITY == 32
    assert cfg.INPUT.FORMAT == "RGB" and cfg.INPUT.COLOR_AUG_SSD is True
    assert cfg.DATASETS.TRAIN == ("acdc-rain_sem_seg_train",)
    assert cfg.DATASETS.TEST == ("acdc-rain_sem_seg_val",)
    solver = cfg.SOLVER
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER, solver.WARMUP_ITERS) == (2, 20, 2)
    assert (solver.BASE_LR, solver.CHECKPOINT_PERIOD, solver.WARMUP_FACTOR) == (0.001, 10, 0.01)
    assert solver.LR_SCHEDULER_NAME == "WarmupCosineLR" and solver.CLIP_MULTIPLIER == 1.0
    assert dict(solver.CLIP_GRADIENTS) == {
        "ENABLED": True,
        "CLIP_TYPE": "full_model",
        "CLIP_VALUE": 0.01,
        "NORM_TYPE": 2.0,
    }
    assert cfg.TEST.EVAL_PERIOD == 0 and cfg.DATALOADER.NUM_WORKERS == 0 and cfg.SEED == 250
    assert cfg.MODEL.LORA.MODUELS == []  # derived from the built model (cat_seg.lora)

    a150 = load_config(CONFIGS / "tiny" / "tiny_a150.yaml")
    assert a150.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert a150.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON == "datasets/ade150.json"
    assert a150.DATASETS.TEST == ("a150_sem_seg_val",) and a150.SOLVER.MAX_ITER == 20


# --------------------------------------------------------------------------------------------------
# _BASE_ resolution in user files
# --------------------------------------------------------------------------------------------------


def test_relative_base_resolves_against_including_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "root.yaml", "SOLVER:\n  MAX_ITER: 11\n  BASE_LR: 0.5\n")
    _write(tmp_path / "sub" / "mid.yaml", "_BASE_: ../root.yaml\nSOLVER:\n  MAX_ITER: 22\nSEED: 3\n")
    leaf = _write(tmp_path / "sub" / "deeper" / "leaf.yaml", "_BASE_: ../mid.yaml\nSEED: 4\n")
    # decoys next to the CWD must not be picked up
    _write(tmp_path / "elsewhere" / "mid.yaml", "SEED: 999\n")
    _write(tmp_path / "elsewhere" / "root.yaml", "SEED: 999\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(leaf)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SEED) == (22, 0.5, 4)
    # a relative path to the top file is taken as given (relative to the caller's CWD)
    cfg_rel = load_config(Path(os.path.relpath(leaf, tmp_path / "elsewhere")))
    assert cfg_rel == cfg


def test_absolute_base(tmp_path: Path) -> None:
    base = _write(tmp_path / "a" / "base.yaml", "SEED: 7\n")
    child = _write(tmp_path / "b" / "child.yaml", f"_BASE_: {base}\nSOLVER:\n  MAX_ITER: 5\n")
    cfg = load_config(child)
    assert (cfg.SEED, cfg.SOLVER.MAX_ITER) == (7, 5)


def test_base_cycle_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "_BASE_: sub/b.yaml\n")
    _write(tmp_path / "sub" / "b.yaml", "_BASE_: ../a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    selfref = _write(tmp_path / "self.yaml", "_BASE_: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(selfref)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = _write(tmp_path / "child.yaml", "_BASE_: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="child.yaml"):
        load_config(child)


def test_malformed_yaml(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "SOLVER: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    not_mapping = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(not_mapping)
    assert load_config(_write(tmp_path / "empty.yaml", "")) == get_cfg()


# --------------------------------------------------------------------------------------------------
# Overrides and strictness
# --------------------------------------------------------------------------------------------------


def test_overrides_like_run_lora_sh() -> None:
    cfg = load_config(
        CONFIGS / "acdc" / "rain" / "lora-rain-acdc.yaml",
        [
            "SOLVER.MAX_ITER", "20",
            "TEST.SLIDING_WINDOW", "True",
            "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]",
            "MODEL.WEIGHTS", "models/model_final.pth",
            "MODEL.LORA.ENABLED", "True",
            "MODEL.LORA.NAME", "acdc-rain",
            "OUTPUT_DIR", "output/acdc-rain/",
            "INPUT.MIN_SIZE_TRAIN", "[256, 320]",
            "DATASETS.TEST", "['a_val', 'b_val']",
            "SOLVER.BASE_LR", "1e-3",
        ],
    )  # fmt: skip
    assert cfg.SOLVER.MAX_ITER == 20 and cfg.TEST.SLIDING_WINDOW is True
    assert cfg.MODEL.SEM_SEG_HEAD.POOLING_SIZES == [1, 1]
    assert cfg.MODEL.WEIGHTS == "models/model_final.pth" and cfg.MODEL.LORA.ENABLED is True
    assert cfg.MODEL.LORA.NAME == "acdc-rain" and cfg.OUTPUT_DIR == "output/acdc-rain/"
    assert cfg.INPUT.MIN_SIZE_TRAIN == (256, 320)  # list given, tuple kept
    assert cfg.DATASETS.TEST == ("a_val", "b_val")
    assert cfg.SOLVER.BASE_LR == 1e-3


def test_later_overrides_win_and_python_values_accepted() -> None:
    cfg = load_config(None, ["SOLVER.MAX_ITER", "3", "SOLVER.MAX_ITER", 4, "SOLVER.WEIGHT_DECAY_BIAS", "0.0"])
    assert cfg.SOLVER.MAX_ITER == 4 and cfg.SOLVER.WEIGHT_DECAY_BIAS == 0.0


def test_modules_alias_in_opts_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["MODEL.LORA.MODULES", "['x.q_proj', 'x.v_proj']"])
    assert cfg.MODEL.LORA.MODUELS == ["x.q_proj", "x.v_proj"] and "MODULES" not in cfg.MODEL.LORA
    f = _write(tmp_path / "lora.yaml", "MODEL:\n  LORA:\n    MODULES: [a.fc1, a.fc2]\n    RANK: 4\n")
    cfg = load_config(f)
    assert cfg.MODEL.LORA.MODUELS == ["a.fc1", "a.fc2"] and cfg.MODEL.LORA.RANK == 4
    both = _write(tmp_path / "both.yaml", "MODEL:\n  LORA:\n    MODULES: [a]\n    MODUELS: [b]\n")
    with pytest.raises(ConfigError, match="MODEL.LORA.MODUELS"):
        load_config(both)


def test_unknown_key_in_opts_names_key() -> None:
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_ITERS") as err:
        load_config(None, ["SOLVER.MAX_ITERS", "10"])
    assert "SOLVER.MAX_ITER" in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match=r"MODEL\.NOPE\.X"):
        load_config(None, ["MODEL.NOPE.X", "1"])
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_ITER\.X"):
        load_config(None, ["SOLVER.MAX_ITER.X", "1"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", "MODEL:\n  SEM_SEG_HEAD:\n    POOLING_SIZE: [1, 1]\n")
    child = _write(tmp_path / "child.yaml", "_BASE_: base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    msg = str(err.value)
    assert "MODEL.SEM_SEG_HEAD.POOLING_SIZE" in msg and str(base) in msg
    blip_keys = _write(tmp_path / "blip.yaml", "SAVE_NAME: 'acdc_blip.pkl'\n")
    with pytest.raises(ConfigError, match="SAVE_NAME"):
        load_config(blip_keys)


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("SOLVER.MAX_ITER", "abc", "expects int"),
        ("SOLVER.BASE_LR", "[1e-4, 2e-4]", "expects float"),
        ("SOLVER.BASE_LR", "1", "expects float"),  # yacs/detectron2: no int -> float coercion
        ("TEST.SLIDING_WINDOW", "1", "expects bool"),
        ("MODEL.SEM_SEG_HEAD.POOLING_SIZES", "['a', 'b']", "holds int"),
        ("INPUT.MIN_SIZE_TRAIN", "(384.5,)", "holds int"),
        ("DATASETS.TRAIN", "(1,)", "holds str"),
        ("MODEL.LORA.MODUELS", "'a.q_proj'", "expects list"),
        ("MODEL.SEM_SEG_HEAD", "3", "group of keys"),
        ("SOLVER.MAX_ITER", "{'a': 1}", "MAX_ITER"),
    ],
)
def test_wrong_type_refused_with_key(key: str, value: str, what: str) -> None:
    with pytest.raises(ConfigError, match=what) as err:
        load_config(None, [key, value])
    assert key in str(err.value)


def test_wrong_type_in_yaml_names_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad_type.yaml", "SOLVER:\n  CHECKPOINT_PERIOD: often\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "SOLVER.CHECKPOINT_PERIOD" in str(err.value) and "bad_type.yaml" in str(err.value)
    # numbers are fine inside float sequences (absolute crop sizes are ints)
    ok = _write(tmp_path / "ok.yaml", "INPUT:\n  CROP:\n    SIZE: (384, 384)\n  MIN_SIZE_TRAIN: (384, )\n")
    cfg = load_config(ok)
    assert cfg.INPUT.CROP.SIZE == (384, 384) and cfg.INPUT.MIN_SIZE_TRAIN == (384,)


def test_odd_or_malformed_opts_refused() -> None:
    with pytest.raises(ConfigError, match="odd number"):
        load_config(None, ["SOLVER.MAX_ITER", "20", "SEED"])
    with pytest.raises(ConfigError, match="single string"):
        load_config(None, "SOLVER.MAX_ITER 20")  # type: ignore[arg-type]


def test_values_validated() -> None:
    assert load_config(None, ["MODEL.DEVICE", "cuda:1"]).MODEL.DEVICE == "cuda:1"
    with pytest.raises(ConfigError, match="MODEL.DEVICE"):
        load_config(None, ["MODEL.DEVICE", "gpu"])
    with pytest.raises(ConfigError, match="PROMPT_ENSEMBLE_TYPE"):
        load_config(None, ["MODEL.PROMPT_ENSEMBLE_TYPE", "imagenet80"])
    with pytest.raises(ConfigError, match="MODEL.LORA.RANK"):
        load_config(None, ["MODEL.LORA.RANK", "0"])


# --------------------------------------------------------------------------------------------------
# Dumping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "opts"),
    [
        ("muses/snow/muses-snow-night.yaml", ["MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]"]),
        (
            "tiny/tiny.yaml",
            ["MODEL.LORA.NAME", "'2024'", "OUTPUT_DIR", "'True'", "SOLVER.WEIGHT_DECAY_BIAS", "0.5"],
        ),
    ],
)
def test_dump_and_reload_identical(tmp_path: Path, rel: str, opts: list[str]) -> None:
    cfg = load_config(CONFIGS / rel, opts)
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert out == tmp_path / "run" / "config.yaml"
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temporary left behind
    again = load_config(out)
    assert again == cfg
    assert type(again.DATASETS.TRAIN) is tuple and type(again.MODEL.LORA.MODUELS) is list
    # overwriting is atomic and gives the same content
    text = out.read_text()
    dump_config(again, out)
    assert out.read_text() == text


def test_dumped_strings_that_look_like_literals(tmp_path: Path) -> None:
    cfg = load_config(None, ["MODEL.LORA.NAME", "'2024'", "OUTPUT_DIR", "'[1]'"])
    assert cfg.MODEL.LORA.NAME == "2024" and cfg.OUTPUT_DIR == "[1]"
    reloaded = load_config(dump_config(cfg, tmp_path / "c.yaml"))
    assert reloaded.MODEL.LORA.NAME == "2024" and reloaded.OUTPUT_DIR == "[1]"


# --------------------------------------------------------------------------------------------------
# Paths and data files
# --------------------------------------------------------------------------------------------------


def test_catseg_root_and_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert CATSEG_ROOT == REPO_ROOT / "catseg"
    monkeypatch.chdir(tmp_path)
    assert resolve_catseg_path("datasets/cs19.json") == REPO_ROOT / "catseg" / "datasets" / "cs19.json"
    assert resolve_catseg_path(tmp_path / "x.json") == tmp_path / "x.json"
    assert resolve_catseg_path(str(tmp_path)) == tmp_path


EXPECTED_CLASS_COUNTS = {
    "cs19.json": 19,
    "mv65.json": 65,
    "ade150.json": 150,
    "idd30.json": 26,  # 26 names despite the file name (the reference's idd.yaml says NUM_CLASSES 25)
    "pc59.json": 59,
    "nyu40.json": 40,
    "coconut.json": 133,
    "coco.json": 171,
}


def test_class_jsons_named_by_configs_exist() -> None:
    named: set[str] = set()
    for path in ALL_YAMLS:
        cfg = load_config(path)
        named |= {cfg.MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON, cfg.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON}
    named.discard(get_cfg().MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON)  # ADE-847 code default, not shipped
    assert {f"datasets/{name}" for name in EXPECTED_CLASS_COUNTS} <= named
    for rel in named:
        path = resolve_catseg_path(rel)
        assert path.is_file(), rel
        names = json.loads(path.read_text())
        assert isinstance(names, list) and all(isinstance(n, str) for n in names), rel


def test_class_json_counts() -> None:
    for name, count in EXPECTED_CLASS_COUNTS.items():
        names = json.loads(resolve_catseg_path(f"datasets/{name}").read_text())
        assert len(names) == count, name
    assert "bed " in json.loads(resolve_catseg_path("datasets/ade150.json").read_text())


@needs_fixtures
def test_data_files_are_unchanged_copies() -> None:
    ref = FIXTURES / "reference_data"
    for src in sorted((ref / "classes").glob("*.json")):
        assert (CATSEG_ROOT / "datasets" / src.name).read_bytes() == src.read_bytes(), src.name
    for src in sorted((ref / "config").glob("*.yaml")):
        assert (REPO_ROOT / "configs" / src.name).read_bytes() == src.read_bytes(), src.name
    templates = CATSEG_ROOT / "cat_seg" / "modeling" / "prompt_templates.json"
    assert templates.read_bytes() == (ref / "prompt_templates.json").read_bytes()
