"""SAN's training loss (Mask2Former's): Hungarian matching of predicted to ground-truth masks, then
class cross-entropy and point-sampled mask BCE and Dice, on the final and the deep-supervision outputs.

Points: the matcher samples ``num_points`` uniform points per image; the mask losses sample
``num_points`` per matched mask, 75 % of them the most uncertain among ``3 * num_points`` uniform
candidates (PointRend's importance sampling). The torch RNG is drawn in the original's order, so a seeded
run samples the same points as the original code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of ``inputs`` (N, C, H, W) at normalised ``coords`` (N, P, 2) in [0, 1] (x, y).

    Returns:
        (N, C, P). (detectron2's ``point_sample`` with ``align_corners=False``.)
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # (N, P, 1, 2)
    return F.grid_sample(inputs, grid, align_corners=False).squeeze(3)


def uncertain_point_coords(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """PointRend's training points: the most uncertain (|logit| smallest) of ``oversample_ratio *
    num_points`` random candidates, then uniform random points for the rest.

    Args:
        logits: (N, 1, H, W) mask logits.
    Returns:
        (N, num_points, 2) coordinates in [0, 1].
    """
    boxes = logits.shape[0]
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(boxes, sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits, coords).abs()  # (N, 1, S)
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    idx = idx + sampled * torch.arange(boxes, dtype=torch.long, device=logits.device)[:, None]
    coords = coords.view(-1, 2)[idx.view(-1), :].view(boxes, num_uncertain, 2)
    rest = num_points - num_uncertain
    if rest > 0:
        coords = torch.cat([coords, torch.rand(boxes, rest, 2, device=logits.device)], dim=1)
    return coords


def _pairwise_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """(N, P) logits, (M, P) binary targets -> (N, M) mean BCE over points."""
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / inputs.shape[1]


def _pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """(N, P) logits, (M, P) binary targets -> (N, M) Dice loss."""
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth masks minimising
    ``class_weight * (-p(class)) + mask_weight * BCE + dice_weight * Dice`` (on ``num_points`` random points).
    """

    def __init__(self, class_weight: float, mask_weight: float, dice_weight: float, num_points: int) -> None:
        super().__init__()
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, logits: Tensor, masks: Tensor, targets: Sequence[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match.

        Args:
            logits: (B, Q, T + 1) class logits.
            masks: (B, Q, h, w) mask logits.
            targets: per image ``{"labels": (M,), "masks": (M, H, W)}``.
        Returns:
            per image (query indices, target indices), int64, sorted by query.
        """
        from scipy.optimize import linear_sum_assignment

        indices = []
        for b, target in enumerate(targets):
            prob = logits[b].softmax(-1)
            cost_class = -prob[:, target["labels"]]
            out = masks[b][:, None]
            tgt = target["masks"].to(out)[:, None]
            coords = torch.rand(1, self.num_points, 2, device=out.device)
            tgt = point_sample(tgt, coords.repeat(tgt.shape[0], 1, 1)).squeeze(1).float()
            out = point_sample(out, coords.repeat(out.shape[0], 1, 1)).squeeze(1).float()
            cost = (
                self.mask_weight * _pairwise_sigmoid_ce(out, tgt)
                + self.class_weight * cost_class
                + self.dice_weight * _pairwise_dice(out, tgt)
            )
            rows, cols = linear_sum_assignment(cost.reshape(masks.shape[1], -1).cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


class SetCriterion(nn.Module):
    """SAN's weighted losses ``loss_ce``, ``loss_mask``, ``loss_dice`` (and ``_i`` for auxiliary outputs).

    Args:
        num_classes: ``MODEL.SAN.NUM_CLASSES``; sizes the ``empty_weight`` buffer the original checkpoints
            carry. The loss itself weights ``T + 1`` classes for whatever vocabulary of T classes it is
            given (the original required T == NUM_CLASSES).
        eos_coef: weight of the no-object class (0.1).
        class_weight, mask_weight, dice_weight: loss weights (2, 5, 5), also the matching costs.
        num_points, oversample_ratio, importance_sample_ratio: point sampling (112*112, 3, 0.75).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        eos_coef: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.eos_coef = float(eos_coef)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def _class_weight(self, num_logits: int, device: torch.device) -> Tensor:
        if self.empty_weight.numel() == num_logits:
            return self.empty_weight.to(device)
        weight = torch.ones(num_logits, device=device)
        weight[-1] = self.eos_coef
        return weight

    def _losses(
        self, logits: Tensor, masks: Tensor, targets: Sequence[dict], num_masks: float
    ) -> dict[str, Tensor]:
        indices = self.matcher(logits, masks, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        labels = torch.full(logits.shape[:2], logits.shape[-1] - 1, dtype=torch.int64, device=logits.device)
        matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        labels[batch_idx.to(logits.device), src_idx.to(logits.device)] = matched.to(logits.device)
        loss_ce = F.cross_entropy(
            logits.float().transpose(1, 2), labels, self._class_weight(logits.shape[-1], logits.device)
        )
        src = masks[batch_idx, src_idx][:, None]
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).to(src)[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords(
                src, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = point_sample(tgt, coords).squeeze(1)
        point_logits = point_sample(src, coords).squeeze(1)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
        probs = point_logits.sigmoid()
        dice = 1 - (2 * (probs * point_labels).sum(-1) + 1) / (probs.sum(-1) + point_labels.sum(-1) + 1)
        return {
            "loss_ce": loss_ce,
            "loss_mask": bce.mean(1).sum() / num_masks,
            "loss_dice": dice.sum() / num_masks,
        }

    def forward(
        self, logits: Sequence[Tensor], masks: Sequence[Tensor], targets: Sequence[dict]
    ) -> dict[str, Tensor]:
        """Weighted losses.

        Args:
            logits: per decoded block (auxiliary first, final last) (B, Q, T + 1) class logits.
            masks: per decoded block (B, Q, h, w) mask logits.
            targets: per image ``{"labels": (M,) int64, "masks": (M, H, W)}`` (H, W: the padded input size).
        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` of the final block, ``<name>_<i>`` of auxiliary block i.
        """
        num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=logits[-1].device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            world = torch.distributed.get_world_size()
        count = torch.clamp(num_masks / world, min=1).item()
        losses = self._losses(logits[-1], masks[-1], targets, count)
        for i, (aux_logits, aux_masks) in enumerate(zip(logits[:-1], masks[:-1])):
            losses.update(
                {f"{k}_{i}": v for k, v in self._losses(aux_logits, aux_masks, targets, count).items()}
            )
        return {k: v * self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k, v in losses.items()}
