"""Our CLIP towers against open_clip (the oracle), weight loading in every file format, and the token API."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from peft import LoraConfig, get_peft_model

from cat_seg.checkpoint import load_clip_weights
from cat_seg.modeling import CLIP, MODEL_PRESETS
from cat_seg.modeling.text import tokenize

TINY = MODEL_PRESETS["tiny"].clip


def _open_clip_tiny(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(
        layers=TINY.vision_layers,
        width=TINY.vision_width,
        head_width=TINY.vision_width // TINY.vision_heads,
        patch_size=TINY.vision_patch_size,
        image_size=TINY.image_size,
    )
    text = CLIPTextCfg(
        context_length=TINY.context_length,
        vocab_size=TINY.vocab_size,
        width=TINY.text_width,
        heads=TINY.text_heads,
        layers=TINY.text_layers,
    )
    model = open_clip.CLIP(embed_dim=TINY.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    with torch.no_grad():  # non-zero biases so that bias handling is checked too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, TINY.image_size, TINY.image_size, generator=g)
    tokens = tokenize(["a photo of a road.", "sky", "A photo of a traffic light in the scene"])
    return images, tokens


def _assert_parity(ours: CLIP, oracle: open_clip.CLIP) -> None:
    images, tokens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), oracle.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens), oracle.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def oracle() -> open_clip.CLIP:
    return _open_clip_tiny()


def test_open_clip_state_dict_parity(tmp_path, oracle) -> None:  # noqa: ANN001
    path = tmp_path / "open_clip.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in oracle.state_dict().items()}}, path)
    torch.manual_seed(123)
    ours = CLIP(TINY).eval()
    result = load_clip_weights(ours, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_parity(ours, oracle)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_openai_torchscript_archive_parity(tmp_path, oracle) -> None:  # noqa: ANN001
    path = tmp_path / "ViT-tiny.pt"
    # An OpenAI-style TorchScript archive: the traced model, as OpenAI distributes its CLIP weights.
    images, tokens = _inputs()
    traced = torch.jit.trace_module(
        _open_clip_tiny(),
        {"forward": (images, tokens), "encode_image": (images,), "encode_text": (tokens,)},
        check_trace=False,
    )
    torch.jit.save(traced, str(path))
    ours = CLIP(TINY).eval()
    load_clip_weights(ours, path)
    _assert_parity(ours, oracle)


def test_safetensors_and_catseg_prefixed_weights(tmp_path, oracle) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    prefixed = {
        f"sem_seg_head.predictor.clip_model.{k}": v.contiguous() for k, v in oracle.state_dict().items()
    }
    prefixed["sem_seg_head.predictor.transformer.conv1.weight"] = torch.zeros(1)  # ignored: not CLIP
    path = tmp_path / "clip.safetensors"
    save_file(prefixed, str(path))
    ours = CLIP(TINY).eval()
    load_clip_weights(ours, path)
    _assert_parity(ours, oracle)


def test_clip_weights_go_into_the_clip_of_another_model_family(tmp_path, oracle) -> None:  # noqa: ANN001
    """A model without CAT-Seg's ``sem_seg_head`` takes the weights into its ``clip_model`` (SAN: the CLIP
    whose modules its extractor, recognition head and classifier share)."""
    from safetensors.torch import save_file

    from cat_seg.config import load_config, resolve_catseg_path
    from cat_seg.modeling import build_model

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path))
    san = build_model(load_config(resolve_catseg_path("configs/san/san_tiny.yaml")), "cpu")
    result = load_clip_weights(san, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_parity(san.clip_model.eval(), oracle)
    state = san.state_dict()  # under SAN's own names
    torch.testing.assert_close(state["clip_visual_extractor.conv1.weight"], oracle.visual.conv1.weight)
    torch.testing.assert_close(state["ov_classifier.token_embedding.weight"], oracle.token_embedding.weight)


def test_text_features_only_depend_on_tokens_up_to_end_of_text() -> None:
    torch.manual_seed(0)
    ours = CLIP(TINY).eval()
    tokens = tokenize(["road", "a much longer prompt with many more words in it"])
    with torch.no_grad():
        both = ours.encode_text(tokens)
        alone = ours.encode_text(tokens[:1])
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=0)


def test_intermediates_are_block_outputs() -> None:
    torch.manual_seed(0)
    visual = CLIP(TINY).visual.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, (first, second) = visual.forward_intermediates(images, dense=True, indices=(0, 1))
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        b0 = visual.transformer.resblocks[0](x)
        b1 = visual.transformer.resblocks[1](b0)
    torch.testing.assert_close(first, b0)
    torch.testing.assert_close(second, b1)
    assert tokens.shape == (2, 1 + 16, TINY.embed_dim)


def test_positional_embedding_is_resized_for_other_grids() -> None:
    visual = CLIP(TINY).visual
    native = visual.resized_positional_embedding(4, 4)
    assert native is visual.positional_embedding
    resized = visual.resized_positional_embedding(6, 6)
    assert resized.shape == (1 + 36, TINY.vision_width)
    torch.testing.assert_close(resized[0], visual.positional_embedding[0])
    out = visual(torch.randn(1, 3, 48, 48), dense=True)  # 6 x 6 tokens at 48 px
    assert out.shape == (1, 1 + 36, TINY.embed_dim)


@pytest.mark.parametrize("module", ["q_proj", "k_proj", "v_proj"])
def test_lora_on_attention_projections_takes_effect(module: str) -> None:
    """Unlike the original code, a LoRA on attn.q/k/v_proj changes the output."""
    torch.manual_seed(0)
    clip = CLIP(TINY).eval()
    images = torch.randn(1, 3, 32, 32)
    tokens = tokenize(["road"])
    with torch.no_grad():
        base_image, base_text = clip.encode_image(images), clip.encode_text(tokens)
    targets = [f"visual.transformer.resblocks.0.attn.{module}", f"transformer.resblocks.0.attn.{module}"]
    peft_model = get_peft_model(clip, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        lora_image, lora_text = clip.encode_image(images), clip.encode_text(tokens)
    assert (lora_image - base_image).abs().max() > 1e-3
    assert (lora_text - base_text).abs().max() > 1e-3
