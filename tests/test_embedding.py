"""Image embedders against their oracles: transformers' slow CLIP processor + ``get_image_features``,
open_clip's eval transform + ``encode_image``, and a hand computation with the tiny CAT-Seg model."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_tiny
from PIL import Image

from domain_orchestrator.embedding import (
    ClipPreprocess,
    EmbeddingError,
    _hf_preprocess,
    load_embedder,
    load_image,
)

HF_SIZE = 48  # the tiny CLIPModel's image size (6 x 6 patches of 8)

# (file name, PIL mode, (width, height)): landscape, portrait JPEG, smaller than the crop, RGBA, greyscale,
# exactly the crop size.
IMAGES = (
    ("landscape.png", "RGB", (97, 53)),
    ("portrait.jpg", "RGB", (41, 88)),
    ("small.png", "RGB", (19, 23)),
    ("rgba.png", "RGBA", (64, 50)),
    ("grey.png", "L", (50, 77)),
    ("exact.png", "RGB", (48, 48)),
)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:  # noqa: ANN001
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, mode, (w, h) in IMAGES:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        # Smooth gradients plus noise, so that resampling filters make a difference.
        grid = np.add.outer(np.linspace(0, 160, h), np.linspace(0, 80, w))[..., None]
        pixels = grid + rng.integers(0, 96, size=(h, w, channels))
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        path = folder / name
        image.save(path, quality=90) if name.endswith(".jpg") else image.save(path)
        paths.append(path)
    return paths


def _original_read(path: Path) -> Image.Image:
    """How the original code reads an image before its CLIPProcessor."""
    return Image.open(path).convert("RGB")


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel
# --------------------------------------------------------------------------------------------------


def _tiny_hf_clip(seed: int = 0):  # noqa: ANN202
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=97,
            eos_token_id=98,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=HF_SIZE,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # non-zero biases and layer-norm parameters, so that all of them are exercised
        for name, p in model.vision_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _save_hf(model, folder: Path, preprocessor: dict | None) -> Path:  # noqa: ANN001
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


HF_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": HF_SIZE},
    "crop_size": {"height": HF_SIZE, "width": HF_SIZE},
    "do_resize": True,
    "do_center_crop": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "do_convert_rgb": True,
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:  # noqa: ANN001
    return _save_hf(_tiny_hf_clip(), tmp_path_factory.mktemp("hf_clip"), HF_PREPROCESSOR)


@pytest.fixture(scope="module")
def hf_embedder(hf_folder):  # noqa: ANN001, ANN201
    return load_embedder(hf_folder)


def test_hf_matches_clip_processor_and_get_image_features(hf_folder, hf_embedder, image_files) -> None:  # noqa: ANN001
    from transformers import AutoImageProcessor, CLIPModel

    # transformers 5's PIL backend is 4.x's slow CLIPImageProcessor (use_fast=False), CLIPProcessor's image part.
    processor = AutoImageProcessor.from_pretrained(hf_folder, backend="pil")
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    model = CLIPModel.from_pretrained(hf_folder, local_files_only=True).eval()
    expected_pixels = processor(images=[_original_read(p) for p in image_files], return_tensors="pt")[
        "pixel_values"
    ]
    ours_pixels = torch.stack([hf_embedder.preprocess(hf_embedder.load_image(p)) for p in image_files])
    torch.testing.assert_close(ours_pixels, expected_pixels, atol=0, rtol=0)  # the same float32 arithmetic
    with torch.no_grad():
        out = model.get_image_features(pixel_values=expected_pixels)
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    ours = hf_embedder.embed_files(image_files, batch_size=4, progress=False)
    assert ours.shape == (len(image_files), 24) and ours.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(ours), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="shortest-48-crop-48"),
        pytest.param({"size": {"shortest_edge": 40}}, id="resize-smaller-than-crop-pads"),
        pytest.param({"size": {"shortest_edge": 57}, "resample": 2}, id="odd-offsets-bilinear"),
        pytest.param(
            # the legacy format of openai/clip-vit-large-patch14's preprocessor_config.json
            {"feature_extractor_type": "CLIPFeatureExtractor", "size": 48, "crop_size": 48},
            id="legacy-int-sizes",
        ),
        pytest.param(
            {
                "size": {"height": 40, "width": 56},
                "crop_size": {"height": 32, "width": 48},
                "image_mean": [0.5, 0.4, 0.3],
                "image_std": [0.2, 0.3, 0.25],
                "rescale_factor": 1 / 127.5,
            },
            id="fixed-size-rectangular-crop",
        ),
    ],
)
def test_preprocessing_equals_the_slow_clip_image_processor(tmp_path, image_files, config) -> None:  # noqa: ANN001
    from transformers import CLIPImageProcessorPil

    merged = {**HF_PREPROCESSOR, **config}
    if "feature_extractor_type" in config:
        del merged["image_processor_type"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(merged))
    ours = _hf_preprocess(tmp_path)
    processor = CLIPImageProcessorPil.from_pretrained(tmp_path)
    for path in image_files:
        expected = processor(images=_original_read(path), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(load_image(path)), expected, atol=0, rtol=0, msg=str(path))


# --------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------

OC_NAME = "semla-test-tiny"
OC_CFG = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 40, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):  # noqa: ANN001, ANN201
    """A tiny open_clip model registered under OC_NAME (for this module only), its checkpoint as a
    safetensors file, and two ``local-dir`` folders (default and custom preprocessing)."""
    import open_clip
    from open_clip import factory
    from safetensors.torch import save_file

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(factory._MODEL_CONFIGS, OC_NAME, OC_CFG)
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(OC_NAME)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.05)
        model.eval()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        root = tmp_path_factory.mktemp("open_clip")
        checkpoint = root / "tiny:weights.safetensors"  # a colon in the path, as the spec allows
        save_file(state, str(checkpoint))
        folders = {}
        custom = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
        for key, preprocess_cfg in (("default", {}), ("custom", custom)):
            folder = root / f"local-{key}"
            folder.mkdir()
            (folder / "open_clip_config.json").write_text(
                json.dumps({"model_cfg": OC_CFG, "preprocess_cfg": preprocess_cfg})
            )
            torch.save(state, folder / "open_clip_pytorch_model.bin")
            folders[key] = folder
        yield types.SimpleNamespace(
            model=model, preprocess=preprocess, checkpoint=checkpoint, folders=folders, custom=custom
        )


def _open_clip_oracle(model, preprocess, paths) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(_original_read(p)) for p in paths]))


def test_open_clip_matches_its_transform_and_encode_image(open_clip_files, image_files) -> None:  # noqa: ANN001
    from open_clip.transform import PreprocessCfg, image_transform_v2

    f = open_clip_files
    expected = _open_clip_oracle(f.model, f.preprocess, image_files)
    named = load_embedder(f"open_clip:{OC_NAME}:{f.checkpoint}")
    local = load_embedder(f.folders["default"])
    for embedder in (named, local):
        ours = embedder.embed_files(image_files, batch_size=4, progress=False)
        torch.testing.assert_close(torch.from_numpy(ours), expected, atol=1e-5, rtol=0)
    assert named.identity == local.identity  # same model, either spelling
    assert named.identity["name"] == OC_NAME and named.dim == 24

    custom = load_embedder(f"local-dir:{f.folders['custom']}")
    transform = image_transform_v2(PreprocessCfg(size=40, **f.custom), is_train=False)
    ours = custom.embed_files(image_files, batch_size=3, progress=False)
    torch.testing.assert_close(
        torch.from_numpy(ours), _open_clip_oracle(f.model, transform, image_files), atol=1e-5, rtol=0
    )
    assert custom.identity["digest"] != named.identity["digest"]  # the preprocessing is part of it


# --------------------------------------------------------------------------------------------------
# catseg
# --------------------------------------------------------------------------------------------------


def _catseg_by_hand(model, path: Path) -> torch.Tensor:  # noqa: ANN001
    """Shortest side to the CLIP resolution (PIL bicubic), centre crop, 0-255 CLIP normalisation."""
    res = model.clip_resolution
    image = Image.open(path).convert("RGB")
    w, h = image.size
    size = (res, int(res * h / w)) if w <= h else (int(res * w / h), res)  # (width, height)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - res) // 2, (size[1] - res) // 2
    x = torch.from_numpy(np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.float32))
    return (x.permute(2, 0, 1) - model.clip_pixel_mean) / model.clip_pixel_std


def test_catseg_is_the_projected_cls_feature_and_leaves_the_model_alone(image_files) -> None:  # noqa: ANN001
    model = build_tiny()
    model.train()
    model.sem_seg_head.predictor.transformer.eval()  # mixed modes: each must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    embedder = load_embedder("catseg", catseg_model=model)
    ours = embedder.embed_files(image_files, batch_size=4, progress=False)
    identity = embedder.identity

    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        expected = model.clip_model.visual(torch.stack([_catseg_by_hand(model, p) for p in image_files]))
    torch.testing.assert_close(torch.from_numpy(ours), expected, atol=1e-5, rtol=0)
    assert identity["kind"] == "catseg" and identity["dim"] == expected.shape[1]

    # Only the image tower is in the digest.
    with torch.no_grad():
        model.sem_seg_head.predictor.transformer.parameters().__next__().add_(1.0)
        assert embedder.identity == identity
        model.clip_model.visual.proj[0, 0] += 1.0
    assert embedder.identity["digest"] != identity["digest"]

    with torch.inference_mode():  # inference tensors have no version counter: recomputed every time
        model.clip_model.visual.register_buffer("extra", torch.zeros(2))
    assert embedder.identity == embedder.identity


def test_catseg_refuses_fused_or_peft_layers_and_a_missing_model() -> None:
    model = build_tiny()
    embedder = load_embedder("catseg", catseg_model=model)
    pixels = torch.zeros(1, 3, model.clip_resolution, model.clip_resolution)
    layer = model.clip_model.visual.transformer.resblocks[0].mlp.c_fc
    layer.forward = types.MethodType(lambda self, x: x, layer)  # what fused_adapters does
    with pytest.raises(RuntimeError, match="fused_adapters"):
        embedder.embed_batch(pixels)
    del layer.forward
    embedder.embed_batch(pixels)
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(target_modules=["c_fc"]), model.clip_model.visual)
    with pytest.raises(RuntimeError, match="wrapped by PEFT"):
        embedder.embed_batch(pixels)
    with pytest.raises(EmbeddingError, match="catseg_model"):
        load_embedder("catseg")


# --------------------------------------------------------------------------------------------------
# Batching, determinism, identity
# --------------------------------------------------------------------------------------------------


def test_batch_size_workers_and_repeats_give_the_same_vectors(hf_embedder, image_files, caplog) -> None:  # noqa: ANN001
    four = hf_embedder.embed_files(image_files, batch_size=4, progress=False)
    with caplog.at_level(logging.INFO):
        again = hf_embedder.embed_files(image_files, batch_size=4, progress=True, desc="embedding-test")
    # Without a terminal, progress is a log line (a tqdm bar on a terminal).
    assert f"embedding-test: {len(image_files)}/{len(image_files)} (100%) img" in caplog.text
    one = hf_embedder.embed_files(image_files, batch_size=1, progress=False)
    workers = hf_embedder.embed_files(image_files, batch_size=2, num_workers=1, progress=False)
    images = hf_embedder.embed_images([Image.open(p) for p in image_files]).numpy()
    assert np.array_equal(four, again)  # deterministic
    for other in (one, workers, images):
        np.testing.assert_allclose(other, four, atol=1e-5, rtol=0)
    assert hf_embedder.embed_files([], progress=False).shape == (0, 24)


def test_identity_covers_the_image_weights_only_and_never_the_path(hf_folder, hf_embedder, tmp_path) -> None:  # noqa: ANN001
    from transformers import CLIPModel

    identity = hf_embedder.identity
    assert set(identity) == {"kind", "name", "dim", "digest"}
    assert identity["kind"] == "hf_clip" and identity["dim"] == 24 and len(identity["digest"]) == 64
    assert json.loads(json.dumps(identity)) == identity

    copy = shutil.copytree(hf_folder, tmp_path / "renamed copy")
    assert load_embedder(copy).identity == identity

    model = CLIPModel.from_pretrained(hf_folder, local_files_only=True)
    with torch.no_grad():
        model.text_model.final_layer_norm.bias.add_(1.0)  # text tower: same image embeddings
    _save_hf(model, tmp_path / "text", HF_PREPROCESSOR)
    assert load_embedder(tmp_path / "text").identity == identity
    with torch.no_grad():
        model.vision_model.encoder.layers[1].mlp.fc2.bias[3] += 1e-3
    _save_hf(model, tmp_path / "vision", HF_PREPROCESSOR)
    assert load_embedder(tmp_path / "vision").identity["digest"] != identity["digest"]

    changed = load_embedder(copy)
    with torch.no_grad():
        changed.model.visual_projection.weight[0, 0] += 1.0  # in memory, after a first identity
    assert changed.identity["digest"] != identity["digest"]

    other_preprocess = shutil.copytree(hf_folder, tmp_path / "bilinear")
    (other_preprocess / "preprocessor_config.json").write_text(json.dumps({**HF_PREPROCESSOR, "resample": 2}))
    assert load_embedder(other_preprocess).identity["digest"] != identity["digest"]


# --------------------------------------------------------------------------------------------------
# Errors and imports
# --------------------------------------------------------------------------------------------------


def test_bad_specs_name_the_path_and_the_problem(tmp_path, hf_folder, open_clip_files) -> None:  # noqa: ANN001
    def fails(spec, match: str) -> None:  # noqa: ANN001
        with pytest.raises(EmbeddingError, match=match):
            load_embedder(spec)

    fails(tmp_path / "nowhere", "nowhere")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", r"empty is not an embedding model; accepted: 'catseg'")
    fails("ViT-B-16", "ViT-B-16")
    fails(open_clip_files.checkpoint, "is not an embedding model")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fails(bert, "model_type is 'bert'")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_folder / "config.json", no_weights)
    shutil.copy(hf_folder / "preprocessor_config.json", no_weights)
    fails(no_weights, "no_weights: cannot load a Hugging Face CLIPModel")
    wrong_crop = shutil.copytree(hf_folder, tmp_path / "wrong_crop")
    (wrong_crop / "preprocessor_config.json").write_text(
        json.dumps({**HF_PREPROCESSOR, "crop_size": {"height": 40, "width": 40}})
    )
    fails(wrong_crop, r"wrong_crop: the preprocessing gives \(40, 40\) images but the model takes 48x48")
    no_preprocessor = shutil.copytree(hf_folder, tmp_path / "no_preprocessor")
    (no_preprocessor / "preprocessor_config.json").unlink()
    fails(no_preprocessor, r"gives \(224, 224\) images")  # the OpenAI default

    fails("open_clip:ViT-B-16", "open_clip:<model name>:<checkpoint file>")
    fails(f"open_clip:ViT-B-16:{tmp_path / 'missing.pt'}", "checkpoint file not found: .*missing.pt")
    fails(
        f"open_clip:no-such-model:{open_clip_files.checkpoint}", "does not know a model named 'no-such-model'"
    )
    fails(
        f"open_clip:{OC_NAME}:{hf_folder / 'model.safetensors'}",
        r"model.safetensors: cannot load the open_clip",
    )
    fails(f"local-dir:{tmp_path / 'gone'}", "gone")
    no_oc_weights = tmp_path / "no_oc_weights"
    no_oc_weights.mkdir()
    shutil.copy(open_clip_files.folders["default"] / "open_clip_config.json", no_oc_weights)
    fails(no_oc_weights, "no_oc_weights: cannot load the open_clip model")


def test_unreadable_images_are_errors_naming_the_file(tmp_path, hf_embedder, image_files) -> None:  # noqa: ANN001
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(image_files[1].read_bytes()[:400])
    missing = tmp_path / "missing.png"
    for bad in (corrupt, text, truncated, missing):
        with pytest.raises(EmbeddingError, match=bad.name):
            load_image(bad)
        with pytest.raises(EmbeddingError, match=bad.name):
            hf_embedder.embed_files([image_files[0], bad, image_files[2]], batch_size=2, progress=False)
    with pytest.raises(EmbeddingError, match="truncated.jpg"):  # also from a worker process
        hf_embedder.embed_files([image_files[0], truncated], num_workers=1, progress=False)


def test_preprocess_converts_to_rgb_like_the_original_read(hf_embedder, image_files) -> None:  # noqa: ANN001
    rgba = image_files[3]
    assert Image.open(rgba).mode == "RGBA"
    from_file = hf_embedder.preprocess(hf_embedder.load_image(rgba))
    assert torch.equal(hf_embedder.preprocess(Image.open(rgba)), from_file)
    assert isinstance(hf_embedder.transform, ClipPreprocess) and from_file.shape == (3, HF_SIZE, HF_SIZE)


def test_importing_the_module_imports_neither_transformers_nor_open_clip(monkeypatch) -> None:  # noqa: ANN001
    """Re-import the module with both packages blocked (an import of either would raise).

    In-process rather than in a fresh interpreter, which would spend seconds importing torch.
    """
    import domain_orchestrator

    for blocked in ("transformers", "open_clip"):
        monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(sys.modules, "domain_orchestrator.embedding")
    monkeypatch.setattr(domain_orchestrator, "embedding", None)
    module = importlib.import_module("domain_orchestrator.embedding")
    assert module.load_embedder is not load_embedder  # really imported again
