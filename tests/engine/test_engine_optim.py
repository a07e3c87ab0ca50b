"""Optimizer parameter groups (CAT-Seg's rules) and gradient clipping, with hand-computed values."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import TINY_CONFIG
from torch import nn

from cat_seg.config import load_config
from cat_seg.engine.optim import GradientClipper, build_gradient_clipper, build_optimizer

SOLVER_OPTS = (
    "SOLVER.BASE_LR", "0.1", "SOLVER.WEIGHT_DECAY", "0.01", "SOLVER.WEIGHT_DECAY_NORM", "0.002",
    "SOLVER.WEIGHT_DECAY_EMBED", "0.003", "SOLVER.BACKBONE_MULTIPLIER", "0.5", "SOLVER.CLIP_MULTIPLIER", "0.25",
)  # fmt: skip


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.clip_model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        self.backbone = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.head.relative_position_bias_table = nn.Parameter(torch.zeros(3))
        self.embed = nn.Embedding(3, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.alias = self.head  # shared module: its parameters are optimised once


def _hyperparams(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: (round(g["lr"], 12), round(g["weight_decay"], 12))
        for g in optimizer.param_groups
        for p in g["params"]
    }


def test_parameter_groups_follow_catseg_rules() -> None:
    cfg = load_config(TINY_CONFIG, list(SOLVER_OPTS))
    model = Toy()
    optimizer, summary = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert _hyperparams(optimizer, model) == (
        {
            "clip_model.0.weight": (0.025, 0.01),  # lr x CLIP_MULTIPLIER
            "clip_model.0.bias": (0.025, 0.01),
            "clip_model.1.weight": (0.025, 0.002),  # norm layer: WEIGHT_DECAY_NORM
            "clip_model.1.bias": (0.025, 0.002),
            "backbone.weight": (0.05, 0.01),  # lr x BACKBONE_MULTIPLIER
            "backbone.bias": (0.05, 0.01),
            "head.weight": (0.1, 0.01),
            "head.bias": (0.1, 0.01),
            "head.relative_position_bias_table": (0.1, 0.0),  # no decay
            "embed.weight": (0.1, 0.003),  # WEIGHT_DECAY_EMBED
        }
    )
    assert sum(s.num_tensors for s in summary) == 10 and len(summary) == len(optimizer.param_groups) == 6
    assert sum(s.numel for s in summary) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_groups_of_the_tiny_model() -> None:
    from cat_seg.engine.lora import attach_lora
    from cat_seg.modeling import build_model

    cfg = load_config(TINY_CONFIG, ["SOLVER.CLIP_MULTIPLIER", "0.01"])
    torch.manual_seed(0)
    model = attach_lora(build_model(cfg, "cpu"), cfg)
    optimizer, summary = build_optimizer(cfg, model)
    by_lr = {round(s.lr, 12): s for s in summary}
    assert set(by_lr) == {1e-5, 1e-3}
    assert by_lr[1e-5].num_tensors == (3 + 2) * 5 * 2  # CLIP blocks x (q, k, v, c_fc, c_proj) x (A, B)
    assert by_lr[1e-3].num_tensors == 2 * 17 * 2  # aggregator layers x targets x (A, B)
    assert all("clip_model" in n for n in by_lr[1e-5].names)
    assert all("lora_" in n for s in summary for n in s.names)


def test_sgd_and_unknown_optimizer() -> None:
    model = Toy()
    optimizer, _ = build_optimizer(
        load_config(TINY_CONFIG, ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.8"]), model
    )
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.8
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got 'LAMB'"):
        build_optimizer(load_config(TINY_CONFIG, ["SOLVER.OPTIMIZER", "LAMB"]), model)


def _params_with_grads(*grads: list[float]) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def test_full_model_clipping_scales_all_gradients_together() -> None:
    clipper = build_gradient_clipper(load_config(TINY_CONFIG, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0"]))
    assert clipper == GradientClipper("full_model", 1.0, 2.0)
    params = _params_with_grads([3.0, 0.0], [0.0, 4.0])  # total norm 5
    assert clipper(params) == pytest.approx(5.0)
    torch.testing.assert_close(
        torch.cat([p.grad for p in params]), torch.tensor([0.6, 0.0, 0.0, 0.8]), atol=1e-6, rtol=0
    )


def test_per_parameter_clipping_and_disabled_clipping() -> None:
    value = build_gradient_clipper(
        load_config(
            TINY_CONFIG,
            ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5"],
        )
    )
    params = _params_with_grads([3.0, -0.2], [0.0, 4.0])
    assert value is not None and value(params) is None
    torch.testing.assert_close(torch.cat([p.grad for p in params]), torch.tensor([0.5, -0.2, 0.0, 0.5]))
    norm = build_gradient_clipper(
        load_config(
            TINY_CONFIG,
            ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5"],
        )
    )
    params = _params_with_grads([3.0, 4.0], [0.0, 0.1])  # each parameter on its own: norms 5 and 0.1
    assert norm is not None
    norm(params)
    torch.testing.assert_close(
        torch.cat([p.grad for p in params]), torch.tensor([0.3, 0.4, 0.0, 0.1]), atol=1e-6, rtol=0
    )
    assert (
        build_gradient_clipper(load_config(TINY_CONFIG, ["SOLVER.CLIP_GRADIENTS.ENABLED", "False"])) is None
    )
    assert (
        build_gradient_clipper(load_config(TINY_CONFIG, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.0"])) is None
    )
    with pytest.raises(ValueError, match="CLIP_TYPE must be"):
        build_gradient_clipper(load_config(TINY_CONFIG, ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"]))
