"""The adapter library: reading PEFT's format, stacking, and one clear error per kind of bad adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build_tiny
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from cat_seg.lora import semla_target_modules
from domain_orchestrator.library import AdapterLibrary, AdapterLibraryError
from domain_orchestrator.prototypes import load_prototypes
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

VISUAL = "sem_seg_head.predictor.clip_model.visual.transformer.resblocks"


@pytest.fixture
def model():  # noqa: ANN201
    return build_tiny()


def _library(tmp_path, model, names=("a", "b"), dims=(16, 16)):  # noqa: ANN001, ANN202
    shapes = linear_shapes(model, semla_target_modules(model))
    for i, (name, dim) in enumerate(zip(names, dims)):
        write_random_adapter(tmp_path / name, shapes, rank=4, alpha=8, seed=i, embedding=np.ones(dim) * i)
    return tmp_path


def test_reads_what_peft_save_pretrained_writes(tmp_path, model) -> None:  # noqa: ANN001
    targets = [
        f"{VISUAL}.0.mlp.c_fc",
        f"{VISUAL}.1.attn.q_proj",
        "sem_seg_head.predictor.transformer.layers.0.attention.MLP.2",
    ]
    peft_model = get_peft_model(
        build_tiny(), LoraConfig(r=4, lora_alpha=16, target_modules=targets), adapter_name="cs"
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path))  # writes tmp_path/cs/
    np.savez(
        tmp_path / "cs" / "cs_statistics.npz", train_average_embedding=np.arange(16, dtype=np.float32)[None]
    )
    library = AdapterLibrary.open(tmp_path, model=model)
    assert library.names == ["cs"] and library.infos[0].scaling == 4.0
    assert set(library.layers) == set(targets)
    modules = dict(peft_model.get_base_model().named_modules())
    for target in targets:
        torch.testing.assert_close(library.layers[target].A[0], modules[target].lora_A["cs"].weight)
        torch.testing.assert_close(library.layers[target].B[0], modules[target].lora_B["cs"].weight)
    found = load_prototypes(tmp_path, library.names)  # the prototypes: beside the adapters, read on their own
    assert found.problems == []
    np.testing.assert_array_equal(found.vectors, np.arange(16, dtype=np.float32)[None])


def test_stacks_adapters_of_different_ranks_with_zero_padding(tmp_path, model) -> None:  # noqa: ANN001
    shapes = linear_shapes(model, [f"{VISUAL}.0.mlp.c_fc", f"{VISUAL}.0.mlp.c_proj"])
    write_random_adapter(tmp_path / "r2", shapes, rank=2, alpha=4, embedding=np.zeros(8))
    write_random_adapter(
        tmp_path / "r6",
        {f"{VISUAL}.0.mlp.c_fc": shapes[f"{VISUAL}.0.mlp.c_fc"]},
        rank=6,
        alpha=3,
        use_rslora=True,
        embedding=np.ones(8),
    )
    library = AdapterLibrary.open(tmp_path)
    stack = library.layers[f"{VISUAL}.0.mlp.c_fc"]
    assert stack.A.shape == (2, 6, 64) and stack.B.shape == (2, 256, 6)
    assert not stack.A[0, 2:].any() and not stack.B[0, :, 2:].any()
    assert not library.layers[f"{VISUAL}.0.mlp.c_proj"].A[1].any(), "an adapter without the layer adds zero"
    assert library.scalings.tolist() == [2.0, pytest.approx(3 / 6**0.5)]


def _corrupt(path, key_filter, fn):  # noqa: ANN001, ANN202
    tensors = load_file(str(path))
    for k in [k for k in tensors if key_filter(k)][:1]:
        tensors = fn(tensors, k)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_wrong_target_name(tmp_path, model) -> None:  # noqa: ANN001
    root = _library(tmp_path, model)

    def rename(t, k):  # noqa: ANN001, ANN202
        t[k.replace("resblocks.0", "resblocks.9")] = t.pop(k)
        t[k.replace("resblocks.0", "resblocks.9").replace("lora_A", "lora_B")] = t.pop(
            k.replace("lora_A", "lora_B")
        )
        return t

    _corrupt(root / "b" / "adapter_model.safetensors", lambda k: "resblocks.0.mlp.c_fc.lora_A" in k, rename)
    with pytest.raises(
        AdapterLibraryError, match=r"adapter 'b', module '.*resblocks.9.mlp.c_fc'.*wrong target name"
    ):
        AdapterLibrary.open(root, model=model)


def test_wrong_shape(tmp_path, model) -> None:  # noqa: ANN001
    root = _library(tmp_path, model)

    def widen(t, k):  # noqa: ANN001, ANN202
        t[k] = torch.zeros(4, t[k].shape[1] + 1)
        t[k.replace("lora_A", "lora_B")] = t[k.replace("lora_A", "lora_B")]
        return t

    _corrupt(root / "a" / "adapter_model.safetensors", lambda k: k.endswith("c_fc.lora_A.weight"), widen)
    with pytest.raises(
        AdapterLibraryError, match=r"adapter 'a', module .*c_fc'.*do not fit the layer \(32 -> 128\)"
    ):
        AdapterLibrary.open(root, model=model)

    def bad_rank(t, k):  # noqa: ANN001, ANN202
        t[k] = torch.zeros(3, 64)
        return t

    _corrupt(root / "a" / "adapter_model.safetensors", lambda k: k.endswith("c_fc.lora_A.weight"), bad_rank)
    with pytest.raises(AdapterLibraryError, match="do not match rank r=4"):
        AdapterLibrary.open(root)


def test_nan(tmp_path, model) -> None:  # noqa: ANN001
    root = _library(tmp_path, model)

    def poison(t, k):  # noqa: ANN001, ANN202
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")
        return t

    _corrupt(root / "b" / "adapter_model.safetensors", lambda k: "lora_B" in k, poison)
    with pytest.raises(AdapterLibraryError, match="adapter 'b', module .*NaN or Inf"):
        AdapterLibrary.open(root, model=model)


def test_statistics_are_not_the_library_s_business(tmp_path, model) -> None:  # noqa: ANN001
    """The library reads adapters only; a bad statistics file is load_prototypes' problem, named there."""
    root = _library(tmp_path, model)
    (root / "a" / "a_statistics.npz").unlink()
    assert AdapterLibrary.open(root).names == ["a", "b"]
    assert any(
        "missing statistics" in p and "a_statistics.npz" in p
        for p in load_prototypes(root, ["a", "b"]).problems
    )
    np.savez(root / "a" / "a_statistics.npz", something_else=np.zeros((1, 16)))
    assert any("has no 'train_average_embedding'" in p for p in load_prototypes(root, ["a"]).problems)
    np.savez(root / "a" / "a_statistics.npz", train_average_embedding=np.zeros((2, 16)))
    assert any("must have shape (1, D)" in p for p in load_prototypes(root, ["a"]).problems)


def test_statistics_of_different_dimensions(tmp_path, model) -> None:  # noqa: ANN001
    root = _library(tmp_path, model, dims=(16, 12))
    found = load_prototypes(root, ["a", "b"])
    assert found.vectors is None and any("different dimensions" in p for p in found.problems)


def test_bad_files_and_options(tmp_path, model) -> None:  # noqa: ANN001
    root = _library(tmp_path, model)
    (root / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterLibraryError, match="adapter 'a': .*not a readable safetensors file"):
        AdapterLibrary.open(root)
    (root / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLibraryError, match="adapter 'a': missing .*adapter_model.safetensors"):
        AdapterLibrary.open(root)
    config = json.loads((root / "b" / "adapter_config.json").read_text())
    (root / "b" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterLibraryError, match="adapter 'b': unsupported LoRA options .*use_dora"):
        AdapterLibrary.open(root, ["b"])
    (root / "b" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLibraryError, match="adapter 'b': .*not valid JSON"):
        AdapterLibrary.open(root, ["b"])
    with pytest.raises(AdapterLibraryError, match="adapter 'zzz': folder not found"):
        AdapterLibrary.open(root, ["zzz"])
    with pytest.raises(AdapterLibraryError, match="library folder not found"):
        AdapterLibrary.open(tmp_path / "nowhere")
