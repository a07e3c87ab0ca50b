"""The project's own LoRA (``cat_seg.lora``) against PEFT, the oracle.

The native path must give what ``peft.get_peft_model`` / ``save_pretrained`` / ``PeftModel.from_pretrained``
give: the same initial A under the same seed, the same parameters after training steps, the same files
(key names, shapes, ``adapter_config.json`` field for field), and adapters each side can load from the other.
And ``train_net.py`` must train and evaluate an adapter without importing ``peft`` or ``transformers``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_testlib import CATSEG, REPO_ROOT, TINY_CONFIG, lora_opts, make_root, single_thread
from safetensors import safe_open

from cat_seg.config import load_config, lora_target_modules
from cat_seg.engine.lora import (
    attach_lora,
    load_adapter,
    lora_config_from_cfg,
    save_adapter,
    trainable_state_dict,
)
from cat_seg.engine.optim import build_gradient_clipper, build_optimizer
from cat_seg.engine.schedule import build_lr_scheduler
from cat_seg.lora import LoraLinear, LoraModel, LoraSpec, resolve_target_modules, unsupported_options
from cat_seg.modeling import build_model

NAME = "dom"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _cfg(*opts: str):  # noqa: ANN202 - CfgNode
    return load_config(TINY_CONFIG, ["MODEL.LORA.NAME", NAME, "SOLVER.MAX_ITER", "3", *opts])


def _base(cfg, seed: int = 0) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(seed)
    return build_model(cfg, "cpu")


def _peft_attach(model: torch.nn.Module, cfg):  # noqa: ANN001, ANN202 - the oracle: PEFT's get_peft_model
    from peft import get_peft_model

    targets = resolve_target_modules(lora_target_modules(cfg), model)
    peft_model = get_peft_model(model, lora_config_from_cfg(cfg, targets), adapter_name=NAME)
    peft_model.peft_config[NAME].target_modules = list(targets)  # full paths, as attach_lora keeps them
    return peft_model


def _batch(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 19, (32, 32), generator=g),
        }
        for _ in range(2)
    ]


def _eval_inputs() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [
        {
            "image": torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8),
            "height": 40,
            "width": 56,
        }
    ]


def _predict(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_eval_inputs())[0]["sem_seg"]


def _train(model: torch.nn.Module, cfg, steps: int) -> list[float]:  # noqa: ANN001
    """What Trainer.run_step does (fp32): forward, backward, full-model clipping, AdamW, LR schedule."""
    optimizer, _ = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    clipper = build_gradient_clipper(cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    model.train()
    torch.manual_seed(123)  # dropout draws
    for step in range(steps):
        loss = sum(model(_batch(step)).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clipper is not None:
            clipper(params)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def _file_summary(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str] | None]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()  # noqa: SIM118


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------


def test_lora_linear_starts_as_the_base_layer_and_merged_equals_unmerged() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraSpec(r=2, lora_alpha=3, target_modules=("x",)))
    layer.active_adapters = ["a"]
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))  # B = 0
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    merged = torch.nn.functional.linear(x, base.weight + layer.delta_weight("a"), base.bias)
    torch.testing.assert_close(layer(x), merged, rtol=1e-5, atol=1e-6)
    assert layer.scaling["a"] == 1.5
    rs = LoraSpec(r=4, lora_alpha=3, target_modules=("x",), use_rslora=True)
    assert rs.scaling == 1.5
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoraSpec(r=0, lora_alpha=3, target_modules=("x",))


# --------------------------------------------------------------------------------------------------
# Attach and train: native == PEFT
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [(), ("MODEL.LORA.DROPOUT", "0.1", "MODEL.LORA.USE_RSLORA", "True", "MODEL.LORA.RANK", "4")],
    ids=["default", "dropout-rslora-r4"],
)
def test_native_training_equals_peft_training(tmp_path: Path, opts: tuple[str, ...]) -> None:
    cfg = _cfg(*opts)
    torch.manual_seed(7)
    native = attach_lora(_base(cfg), cfg)
    torch.manual_seed(7)
    oracle = _peft_attach(_base(cfg), cfg)
    assert isinstance(native, LoraModel)

    # Same parameter names, order and values (A drawn from the same random stream, B = 0).
    assert list(native.state_dict()) == list(oracle.state_dict())
    assert list(trainable_state_dict(native)) == list(trainable_state_dict(oracle))
    for key, value in oracle.state_dict().items():
        assert torch.equal(native.state_dict()[key], value), key

    losses = _train(native, cfg, 3), _train(oracle, cfg, 3)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    after_native, after_oracle = trainable_state_dict(native), trainable_state_dict(oracle)
    assert any(
        float(v.abs().max()) > 0 for k, v in after_native.items() if ".lora_B." in k
    )  # training moved B
    for key, value in after_oracle.items():
        torch.testing.assert_close(after_native[key], value, rtol=0, atol=1e-6)

    # Same files: key names, shapes, metadata, and adapter_config.json field for field.
    save_adapter(native, tmp_path / "native", NAME)
    oracle.save_pretrained(str(tmp_path / "peft"), selected_adapters=[NAME])
    native_dir, peft_dir = tmp_path / "native" / NAME, tmp_path / "peft" / NAME
    assert _file_summary(native_dir / "adapter_model.safetensors") == _file_summary(
        peft_dir / "adapter_model.safetensors"
    )
    native_config = json.loads((native_dir / "adapter_config.json").read_text())
    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert native_config == peft_config
    assert (native_dir / "adapter_config.json").read_text() == (peft_dir / "adapter_config.json").read_text()
    assert unsupported_options(peft_config) == []


# --------------------------------------------------------------------------------------------------
# Files: each side loads the other's
# --------------------------------------------------------------------------------------------------


def _trained_pair(tmp_path: Path) -> tuple[torch.nn.Module, Path, Path]:
    """A native adapter with random B (saved natively) and the same adapter saved by PEFT."""
    cfg = _cfg()
    torch.manual_seed(3)
    native = attach_lora(_base(cfg), cfg)
    with torch.no_grad():
        for key, value in trainable_state_dict(native).items():
            if ".lora_B." in key:
                value.normal_(0, 0.05)
    oracle = _peft_attach(_base(cfg), cfg)
    oracle.load_state_dict(native.state_dict())
    save_adapter(native, tmp_path / "native", NAME)
    oracle.save_pretrained(str(tmp_path / "peft"), selected_adapters=[NAME])
    return native, tmp_path / "native", tmp_path / "peft"


def test_peft_loads_the_native_adapter_and_the_native_loader_loads_peft_s(tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = _cfg()
    native, native_db, peft_db = _trained_pair(tmp_path)
    expected = _predict(native.get_base_model())
    assert (expected - _predict(_base(cfg))).abs().max() > 1e-4  # the adapter matters

    by_peft = PeftModel.from_pretrained(_base(cfg), str(native_db / NAME), adapter_name=NAME)
    torch.testing.assert_close(_predict(by_peft.get_base_model()), expected, rtol=0, atol=1e-6)

    for db in (peft_db, native_db):
        loaded = load_adapter(_base(cfg), db, NAME)
        assert isinstance(loaded, LoraModel)
        assert not trainable_state_dict(loaded) and not loaded.training  # inference mode, as PEFT's
        torch.testing.assert_close(_predict(loaded.get_base_model()), expected, rtol=0, atol=1e-6)
        for key, value in trainable_state_dict(native).items():
            assert torch.equal(loaded.state_dict()[key], value), key
    # Both loaders give the same module tree and state (PEFT's names).
    assert list(load_adapter(_base(cfg), peft_db, NAME).state_dict()) == list(by_peft.state_dict())


def test_native_loader_refuses_a_file_that_does_not_fit(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from cat_seg.engine.lora import AdapterError

    cfg = _cfg()
    _, native_db, _ = _trained_pair(tmp_path)
    weights = native_db / NAME / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file({**tensors, key: tensors[key][:2]}, str(weights), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: 1 tensors of the wrong shape"):
        load_adapter(_base(cfg), native_db, NAME)
    del tensors[key]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"does not match the model: 0 unexpected tensors \[\], 1 missing"):
        load_adapter(_base(cfg), native_db, NAME)


def test_dora_is_handed_to_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = _cfg("MODEL.LORA.USE_DORA", "True")
    adapted = attach_lora(_base(cfg), cfg)
    assert isinstance(adapted, PeftModel)
    save_adapter(adapted, tmp_path, NAME)
    config = json.loads((tmp_path / NAME / "adapter_config.json").read_text())
    assert unsupported_options(config) == ["use_dora=True"]
    loaded = load_adapter(_base(cfg), tmp_path, NAME)
    assert isinstance(loaded, PeftModel)
    torch.testing.assert_close(_predict(loaded.get_base_model()), _predict(adapted.get_base_model()))


# --------------------------------------------------------------------------------------------------
# train_net.py: no peft, no transformers
# --------------------------------------------------------------------------------------------------

# Runs a script as ``python SCRIPT ARGS`` would, once per argument list, then prints the modules loaded.
_PROBE = """
import json, runpy, sys
script, argv_sets = sys.argv[1], json.loads(sys.argv[2])
codes = []
for argv in argv_sets:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        codes.append(e.code)
print("PROBE " + json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_train_net_trains_and_evaluates_without_importing_peft(tmp_path: Path) -> None:
    root, base = make_root(tmp_path)
    out, db = tmp_path / "out", tmp_path / "db"
    common = ["--config-file", str(TINY_CONFIG), "--data-root", str(root), "--no-progress"]
    train = [*common, "--resume", *lora_opts(out, db, base, max_iter=2)]
    evaluate = [*common, "--eval-only", *lora_opts(out / "eval", db, base, max_iter=2)]
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(CATSEG / "train_net.py"), json.dumps([train, evaluate])],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    assert probe["codes"] == [0, 0], result.stderr[-4000:]
    assert (db / "x" / "adapter_model.safetensors").is_file()
    assert (out / "eval" / "run_info.json").is_file()
    heavy = [m for m in probe["modules"] if m.split(".")[0] in ("peft", "transformers", "open_clip")]
    assert heavy == []
