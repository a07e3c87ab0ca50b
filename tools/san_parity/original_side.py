"""Run the ORIGINAL SAN model (MendelXu/SAN) on random weights and dump weights, inputs and outputs.

This is the "original side" of the SAN parity check. It runs in its own venv
(``.venv-san-original``, see requirements-original.txt): the original code needs open_clip 2.16.
detectron2/fvcore are replaced by ``d2_stub``; no weights are downloaded (CLIP is built with
random init, same architecture, QuickGELU as OpenAI's checkpoints use).

    python tools/san_parity/original_side.py --san-root /tmp/san_orig --preset b16 --out DIR [--seed 0]

Files written to DIR:
  state_dict.pt          model.state_dict() with the original key names
  state_dict_keys.json   [[key, shape], ...] in state_dict order
  inputs.pt              {vocabulary, images, heights, widths, sem_seg, gt_classes}
  eval_out.pt            [sem_seg (C, height, width) per image]   (model.eval(), no_grad)
  eval_intermediates.pt  side adapter / CLIP / rec-head tensors of the eval forward (debugging)
  train_out.pt           {loss name: float} of the train forward (torch.manual_seed(seed + 1) first)
  matcher_indices.pt     [[(src_idx, tgt_idx) per image] per matcher call]  (call 0: final layer,
                         call 1..: aux outputs in order) + the matcher's inputs
  meta.json              versions, commit, cfg, timings
With --fixture PATH it also writes the key/shape fixture JSON used by the project's tests.

The run sets MODEL.SAN.NUM_CLASSES = len(vocabulary) (6; the yaml's is 171), since the criterion's
``empty_weight`` (NUM_CLASSES + 1) must match the train logits (len(vocabulary) + 1 columns): so
``criterion.empty_weight`` in state_dict.pt is [7]. The fixture is taken from a second build with
the yaml's NUM_CLASSES (empty_weight [172]); all other keys and shapes are identical (asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import d2_stub  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SAN_COMMIT = "e19262d1a23992fc2cef934d6756b89ff50fe5c3"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

PRESETS: dict[str, dict[str, Any]] = {
    "b16": {
        "yaml": "configs/san_clip_vit_res4_coco.yaml",
        "expect": {
            "MODEL.SAN.CLIP_MODEL_NAME": "ViT-B/16",
            "MODEL.SAN.CLIP_RESOLUTION": 0.5,
            "MODEL.SAN.FEATURE_LAST_LAYER_IDX": 9,
            "MODEL.SIDE_ADAPTER.FUSION_MAP": ["0->0", "3->1", "6->2", "9->3"],
            "MODEL.SIDE_ADAPTER.ATTN_BIAS.NUM_HEADS": 12,
        },
        "fixture_name": "san_vitb16_state_dict.json",
    },
    "l14": {
        "yaml": "configs/san_clip_vit_large_res4_coco.yaml",
        "expect": {
            "MODEL.SAN.CLIP_MODEL_NAME": "ViT-L-14-336",
            "MODEL.SAN.CLIP_RESOLUTION": 0.7,
            "MODEL.SAN.FEATURE_LAST_LAYER_IDX": 18,
            "MODEL.SIDE_ADAPTER.FUSION_MAP": ["0->0", "6->1", "12->2", "18->3"],
            "MODEL.SIDE_ADAPTER.ATTN_BIAS.NUM_HEADS": 16,
        },
        "fixture_name": "san_vitl14_state_dict.json",
    },
}

VOCABULARY = ["road", "sky", "person", "car", "building", "tree"]
# (C, H, W) of the images, (height, width) asked for at inference, classes present in the labels
IMAGE_SPECS = [
    {"hw": (500, 660), "out": (1000, 1320), "classes": [0, 1, 2, 3, 5]},
    {"hw": (480, 640), "out": (480, 640), "classes": [0, 2, 4, 5]},
]


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that keeps unknown tags (e.g. the base yaml's python/object/apply:eval) as text."""

    def _opaque(loader, tag_suffix, node):
        if isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        elif isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return {"__unevaluated_tag__": tag_suffix, "value": value}

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", _opaque)
    return yaml, Loader


def load_yaml_chain(path: str) -> dict[str, Any]:
    """Load a detectron2 yaml, resolving ``_BASE_`` (relative to the file) like detectron2 does:
    the base first, then this file's values merged over it."""
    yaml, Loader = _yaml_loader()
    with open(path) as f:
        data = yaml.load(f, Loader=Loader) or {}
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    merged = load_yaml_chain(os.path.join(os.path.dirname(path), base))

    def deep_merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep_merge(dst[k], v)
            else:
                dst[k] = v

    deep_merge(merged, data)
    return merged


def build_cfg(san_root: str, preset: str, num_classes: int = None):
    """add_san_config defaults on a bare cfg (INPUT/SOLVER/MODEL) + the preset yaml's values for
    every key that this cfg has. Keys the stub cfg lacks (DATASETS, TEST, ...) are reported.

    ``num_classes`` (if given) replaces MODEL.SAN.NUM_CLASSES (171, COCO-Stuff): the criterion's
    ``empty_weight`` has NUM_CLASSES + 1 entries and must match the train logits, which have
    len(vocabulary) + 1 columns when the batch carries its own vocabulary."""
    from san.config import add_san_config

    CN = d2_stub.CfgNode
    cfg = CN()
    cfg.INPUT = CN()
    cfg.INPUT.CROP = CN()
    cfg.SOLVER = CN()
    cfg.MODEL = CN()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    add_san_config(cfg)

    yaml_path = os.path.join(san_root, PRESETS[preset]["yaml"])
    values = load_yaml_chain(yaml_path)
    applied: dict[str, Any] = {}
    skipped: list[str] = []

    def filter_known(node, src: dict, prefix: str) -> dict:
        kept = {}
        for k, v in src.items():
            name = f"{prefix}{k}"
            if k not in node:
                skipped.append(name)
            elif isinstance(node[k], CN):
                if isinstance(v, dict):
                    sub = filter_known(node[k], v, name + ".")
                    if sub:
                        kept[k] = sub
                else:
                    skipped.append(name)
            else:
                kept[k] = v
                applied[name] = v
        return kept

    known = filter_known(cfg, values, "")
    cfg.merge_from_other_cfg(CN(known))

    def get(dotted: str):
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        return node

    overrides: dict[str, Any] = {}
    if num_classes is not None and num_classes != cfg.MODEL.SAN.NUM_CLASSES:
        overrides["MODEL.SAN.NUM_CLASSES"] = {"from": cfg.MODEL.SAN.NUM_CLASSES, "to": num_classes}
        cfg.MODEL.SAN.NUM_CLASSES = num_classes
    for key, want in PRESETS[preset]["expect"].items():
        got = get(key)
        if isinstance(got, tuple):
            got = list(got)
        if got != want:
            raise RuntimeError(f"{preset}: {key} = {got!r}, expected {want!r}")
    cfg.freeze()
    return cfg, {
        "yaml": PRESETS[preset]["yaml"],
        "applied": applied,
        "skipped": sorted(skipped),
        "overrides": overrides,
    }


def cfg_to_dict(node) -> Any:
    if isinstance(node, dict):
        return {k: cfg_to_dict(v) for k, v in node.items()}
    if isinstance(node, tuple):
        return [cfg_to_dict(v) for v in node]
    return node


# ------------------------------------------------------------------------------------------
# random-weight CLIP instead of open_clip's pretrained download
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def random_init_clip(record: dict[str, Any]):
    """Replace ``open_clip.create_model_and_transforms`` (looked up on the module by san/model/san.py)
    with a builder of the same architecture, random init, QuickGELU (as OpenAI's weights), no download."""
    import open_clip
    from open_clip.transform import image_transform

    original = open_clip.create_model_and_transforms

    def fake_create_model_and_transforms(model_name: str, pretrained: Any = None, **kwargs):
        name = model_name.replace("/", "-")
        record.update(
            {
                "requested_model_name": model_name,
                "requested_pretrained": pretrained,
                "built_model_name": name,
                "force_quick_gelu": True,
                "extra_kwargs": repr(kwargs),
            }
        )
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
        preprocess = image_transform(
            model.visual.image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD
        )
        norm = preprocess.transforms[-1]
        assert tuple(norm.mean) == OPENAI_MEAN and tuple(norm.std) == OPENAI_STD
        return model, None, preprocess

    open_clip.create_model_and_transforms = fake_create_model_and_transforms
    try:
        yield
    finally:
        open_clip.create_model_and_transforms = original


def perturb_parameters(model: torch.nn.Module, std: float = 0.02) -> int:
    """Add N(0, std) noise to every floating parameter (LayerNorm weights/biases, zero biases,
    bias_scaling, query embeddings, ...) so that no comparison passes thanks to 0/1 init."""
    n = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, dtype=p.dtype) * std)
                n += 1
    return n


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _smooth_field(gen: torch.Generator, channels: int, hw: tuple[int, int], cell: int) -> torch.Tensor:
    h, w = hw
    coarse = torch.rand(1, channels, h // cell + 2, w // cell + 2, generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]


def make_inputs(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1000 + seed)
    images, heights, widths, sem_segs, gt_classes = [], [], [], [], []
    for i, spec in enumerate(IMAGE_SPECS):
        h, w = spec["hw"]
        # smooth colour blobs + a little fine noise, integer-valued 0..255 like a decoded photo
        img = 255.0 * _smooth_field(gen, 3, (h, w), cell=37)
        img = img + 12.0 * (torch.rand(3, h, w, generator=gen) - 0.5)
        img = img.clamp(0, 255).round().to(torch.float32)
        images.append(img)
        heights.append(spec["out"][0])
        widths.append(spec["out"][1])

        classes = torch.tensor(spec["classes"], dtype=torch.int64)
        scores = _smooth_field(gen, len(classes), (h, w), cell=61)
        labels = classes[scores.argmax(0)]
        # every listed class present (a small square each), so gt_classes == spec["classes"]
        for j, c in enumerate(spec["classes"]):
            y0, x0 = 10 + 30 * j, 10 + 25 * j
            labels[y0 : y0 + 12, x0 : x0 + 12] = c
        # ignore pixels: a band at the bottom, a block, sparse dots
        labels[h - 17 :, :] = 255
        labels[200 + 10 * i : 260 + 10 * i, 300:380] = 255
        dots = torch.rand(h, w, generator=gen) < 0.01
        labels[dots] = 255
        sem_segs.append(labels.contiguous())
        present = torch.unique(labels)
        gt_classes.append(present[present != 255])
    return {
        "vocabulary": list(VOCABULARY),
        "images": images,
        "heights": heights,
        "widths": widths,
        "sem_seg": sem_segs,
        "gt_classes": gt_classes,
    }


def instances_from_sem_seg(sem_seg: torch.Tensor, ignore_label: int = 255):
    """As MaskFormerSemanticDatasetMapper: classes = sorted unique labels != ignore; one bool mask
    per class, stacked (an all-zero (0, H, W) float tensor if nothing is labelled)."""
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_label]
    inst = d2_stub.Instances(tuple(sem_seg.shape[-2:]))
    inst.gt_classes = classes.to(torch.int64)
    if len(classes) == 0:
        inst.gt_masks = torch.zeros((0,) + tuple(sem_seg.shape[-2:]))
    else:
        inst.gt_masks = torch.stack([sem_seg == c for c in classes])
    return inst


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def _versions() -> dict[str, str]:
    import numpy
    import scipy
    import timm
    from open_clip.version import __version__ as open_clip_version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip_torch": open_clip_version,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }


def _san_tree_info(san_root: str) -> dict[str, Any]:
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "-C", san_root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            or None
        )
    except Exception:
        pass
    files = []
    for dirpath, _, names in os.walk(os.path.join(san_root, "san", "model")):
        files += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    files += [os.path.join(san_root, "san", "config.py"), os.path.join(san_root, "san", "utils", "misc.py")]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(os.path.relpath(path, san_root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return {
        "git_rev_parse": commit,
        "expected_commit": SAN_COMMIT,
        "model_sources_sha256": h.hexdigest(),
        "model_source_files": len(files),
    }


def key_report(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    non_param = {k: list(v.shape) for k, v in sd.items() if k not in params}
    non_persistent = {k: list(v.shape) for k, v in buffers.items() if k not in sd}
    prefixes: dict[str, int] = {}
    for k in sd:
        top = k.split(".")[0]
        prefixes[top] = prefixes.get(top, 0) + 1
    ptrs: dict[int, list[str]] = {}
    for k, v in sd.items():
        ptrs.setdefault(v.data_ptr(), []).append(k)
    return {
        "num_keys": len(sd),
        "num_parameters": sum(v.numel() for v in params.values()),
        "top_level_prefixes": prefixes,
        "state_dict_non_parameter_keys": non_param,
        "non_persistent_buffers_not_in_state_dict": non_persistent,
        "shared_storage_groups": [g for g in ptrs.values() if len(g) > 1],
        "requires_grad_true": [k for k, v in params.items() if v.requires_grad],
        "dtypes": sorted({str(v.dtype) for v in sd.values()}),
    }


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--san-root", required=True, help="checkout of MendelXu/SAN (has san/ and configs/)")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixture", default=None, help="also write the [[key, shape], ...] fixture JSON here")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    if args.threads:
        torch.set_num_threads(args.threads)
    san_root = os.path.abspath(args.san_root)
    os.makedirs(args.out, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    d2_stub.install()
    d2_stub.install_san_package(san_root)
    import san.model  # noqa: F401  (registers SAN in META_ARCH_REGISTRY)
    from san.model.san import SAN

    cfg, cfg_info = build_cfg(san_root, args.preset, num_classes=len(VOCABULARY))

    # ---- build
    t0 = time.perf_counter()
    clip_record: dict[str, Any] = {}
    torch.manual_seed(args.seed)
    with random_init_clip(clip_record):
        model = SAN(cfg)
    n_perturbed = perturb_parameters(model)
    timings["build_s"] = time.perf_counter() - t0

    fixture_keys = None
    if args.fixture:
        # the fixture describes the preset as configured (NUM_CLASSES 171): build that one too
        t0 = time.perf_counter()
        cfg_yaml, _ = build_cfg(san_root, args.preset)
        with random_init_clip({}), torch.random.fork_rng():
            model_yaml = SAN(cfg_yaml)
        fixture_keys = [[k, list(v.shape)] for k, v in model_yaml.state_dict().items()]
        del model_yaml
        timings["build_fixture_model_s"] = time.perf_counter() - t0

    sd = model.state_dict()
    keys = [[k, list(v.shape)] for k, v in sd.items()]
    report = key_report(model, sd)
    t0 = time.perf_counter()
    torch.save(sd, os.path.join(args.out, "state_dict.pt"))
    with open(os.path.join(args.out, "state_dict_keys.json"), "w") as f:
        json.dump(keys, f)
    timings["save_state_dict_s"] = time.perf_counter() - t0

    inputs = make_inputs(args.seed)
    torch.save(inputs, os.path.join(args.out, "inputs.pt"))
    vocabulary = inputs["vocabulary"]

    # ---- eval forward (+ intermediates through hooks; nothing in the model is changed)
    inter: dict[str, Any] = {"side_adapter": [], "rec_head": []}
    hooks = [
        model.side_adapter_network.register_forward_hook(
            lambda m, i, o: inter["side_adapter"].append(
                {"mask_preds": _detach(o[0]), "attn_biases": _detach(o[1])}
            )
        ),
        model.clip_rec_head.register_forward_hook(lambda m, i, o: inter["rec_head"].append(_detach(o))),
    ]
    src_idxs = sorted(
        {int(x.split("->")[0]) for x in cfg.MODEL.SIDE_ADAPTER.FUSION_MAP}
        | {cfg.MODEL.SAN.FEATURE_LAST_LAYER_IDX}
    )

    def keep_clip(m, i, o):
        inter["clip_features"] = {k: _detach(o[k]) for k in src_idxs}
        inter["clip_features"].update({f"{k}_cls_token": _detach(o[f"{k}_cls_token"]) for k in src_idxs})
        inter["clip_input_shape"] = list(i[0].shape)

    hooks.append(model.clip_visual_extractor.register_forward_hook(keep_clip))

    batched = [
        {"image": img, "height": h, "width": w, "vocabulary": vocabulary}
        for img, h, w in zip(inputs["images"], inputs["heights"], inputs["widths"])
    ]
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        results = model(batched)
    timings["eval_forward_s"] = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    eval_out = [r["sem_seg"].detach().clone() for r in results]
    torch.save(eval_out, os.path.join(args.out, "eval_out.pt"))
    with torch.no_grad():
        inter["ov_classifier_weight_unscaled"] = model.ov_classifier.get_classifier_by_vocabulary(
            vocabulary
        ).clone()
        inter["logit_scale"] = model.ov_classifier.logit_scale.detach().clone()
    torch.save(inter, os.path.join(args.out, "eval_intermediates.pt"))
    del results

    # ---- the same eval forward in float64: separates implementation differences from float32 rounding
    model64 = copy.deepcopy(model).double()
    model64.ov_classifier.cache = {}  # the original caches text features per word, in the old dtype
    batched64 = [dict(item, image=item["image"].double()) for item in batched]
    with torch.no_grad():
        eval64 = [r["sem_seg"].detach().clone() for r in model64(batched64)]
    torch.save(eval64, os.path.join(args.out, "eval_out_float64.pt"))
    del model64, eval64

    # ---- train forward (loss dict), matcher indices recorded by wrapping matcher.forward
    matcher_calls: list[dict[str, Any]] = []
    matcher = model.criterion.matcher
    real_forward = matcher.forward

    def recording_forward(outputs, targets):
        indices = real_forward(outputs, targets)
        matcher_calls.append(
            {
                "indices": [(s.clone(), t.clone()) for s, t in indices],
                "pred_logits": _detach(outputs["pred_logits"]),
                "pred_masks": _detach(outputs["pred_masks"]),
            }
        )
        return indices

    matcher.forward = recording_forward
    train_batch = [
        {
            "image": img,
            "height": img.shape[-2],
            "width": img.shape[-1],
            "vocabulary": vocabulary,
            "instances": instances_from_sem_seg(seg),
            "sem_seg": seg,
        }
        for img, seg in zip(inputs["images"], inputs["sem_seg"])
    ]
    model.train()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed + 1)
    losses = model(train_batch)
    timings["train_forward_s"] = time.perf_counter() - t0
    del matcher.forward  # back to the class method
    train_out = {k: float(v.detach()) for k, v in losses.items()}
    torch.save(train_out, os.path.join(args.out, "train_out.pt"))
    torch.save(
        {
            "calls": [c["indices"] for c in matcher_calls],
            "call_names": ["final"] + [f"aux_{i}" for i in range(len(matcher_calls) - 1)],
            "matcher_inputs": [{k: c[k] for k in ("pred_logits", "pred_masks")} for c in matcher_calls],
        },
        os.path.join(args.out, "matcher_indices.pt"),
    )

    timings["total_s"] = time.perf_counter() - t_all
    versions = _versions()
    san_info = _san_tree_info(san_root)
    meta = {
        "preset": args.preset,
        "seed": args.seed,
        "train_seed": args.seed + 1,
        # flat copies for quick reading (compare.py prints these)
        "san_commit": san_info["git_rev_parse"] or SAN_COMMIT,
        "torch": versions["torch"],
        "open_clip": versions["open_clip_torch"],
        "timm": versions["timm"],
        "versions": versions,
        "san": san_info,
        "san_root": san_root,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "torch_threads": torch.get_num_threads()},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cfg_source": cfg_info,
        "cfg_model": cfg_to_dict(copy.deepcopy(cfg.MODEL)),
        "clip": clip_record,
        "perturbation": {
            "std": 0.02,
            "parameters_perturbed": n_perturbed,
            "rng": "continues the torch.manual_seed(seed) stream right after SAN(cfg)",
        },
        "train_rng": "torch.manual_seed(seed + 1) immediately before the train forward",
        "inputs": {
            "image_shapes": [list(x.shape) for x in inputs["images"]],
            "out_sizes": list(zip(inputs["heights"], inputs["widths"])),
            "gt_classes": [c.tolist() for c in inputs["gt_classes"]],
        },
        "outputs": {
            "eval_sem_seg_shapes": [list(x.shape) for x in eval_out],
            "train_losses": train_out,
            "matcher_calls": len(matcher_calls),
        },
        "keys": report,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)

    if args.fixture:
        differing = [(a, b) for a, b in zip(fixture_keys, keys) if a != b]
        assert len(fixture_keys) == len(keys) and all(
            a[0] == "criterion.empty_weight" for a, _ in differing
        ), differing
        fixture = {
            "source": "MendelXu/SAN @ e19262d, built with tools/san_parity/original_side.py",
            "preset": args.preset,
            "config": f"{cfg_info['yaml']} (+ its _BASE_), on san.config.add_san_config defaults "
            "(MODEL.SAN.NUM_CLASSES 171, so criterion.empty_weight is [172])",
            "built_with": {k: meta["versions"][k] for k in ("torch", "open_clip_torch", "timm")},
            "num_keys": len(fixture_keys),
            "state_dict_non_parameter_keys": {
                k: s for k, s in fixture_keys if k in report["state_dict_non_parameter_keys"]
            },
            "non_persistent_buffers_not_in_state_dict": report["non_persistent_buffers_not_in_state_dict"],
            "keys": fixture_keys,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.fixture)), exist_ok=True)
        with open(args.fixture, "w") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")

    print(
        json.dumps(
            {
                "preset": args.preset,
                "out": os.path.abspath(args.out),
                "timings": meta["timings"],
                "losses": train_out,
                "num_keys": len(keys),
                "top_level_prefixes": report["top_level_prefixes"],
                "non_parameter_keys": report["state_dict_non_parameter_keys"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
