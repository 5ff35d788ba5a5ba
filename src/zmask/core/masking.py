"""Eq. 4: from the soft mask to the binary patch mask, the keep-mask, and the masked image.

Pure tensor functions; :class:`zmask.ZMask` and everything built on it (evaluation defenses,
attacks, the command line) call these, so the mask a report shows is the mask the defense used.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import InputError


class MaskEvidence(Protocol):
    """What the straight-through keep-mask reads of an analysis (:class:`zmask.core.analysis.Analysis`)."""

    soft_mask: torch.Tensor  # B x 1 x h x w, differentiable
    score: torch.Tensor  # B, differentiable
    flagged: torch.Tensor  # B bool
    input_size: tuple[int, int]
    mask_threshold: float
    mask_dilation: int
    extreme_score: torch.Tensor | None
    coverage: torch.Tensor | None
    coverage_in_mask: bool


def patch_mask(soft_mask: torch.Tensor, input_size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """1[M~ > threshold] nearest-upsampled to ``input_size`` (B x 1 x H x W float, 1 = patch)."""
    return F.interpolate((soft_mask > threshold).float(), size=tuple(input_size), mode="nearest")


def dilate_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a binary B x 1 x H x W mask by ``pixels`` in every direction (square structuring element).

    Computed as two 1-D max filters (rows, then columns), which equals the square 2-D max filter
    and costs O(pixels) per pixel instead of O(pixels^2).
    """
    if pixels <= 0:
        return mask
    # A radius beyond the image adds nothing: clamping it bounds the work whatever the setting.
    down, across = min(pixels, mask.shape[-2] - 1), min(pixels, mask.shape[-1] - 1)
    rows = F.max_pool2d(mask, (2 * down + 1, 1), stride=1, padding=(down, 0)) if down > 0 else mask
    return F.max_pool2d(rows, (1, 2 * across + 1), stride=1, padding=(0, across)) if across > 0 else rows


def keep_mask(soft_mask: torch.Tensor, flagged: torch.Tensor, input_size: tuple[int, int], threshold: float = 0.5,
              dilation: int = 0, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's keep-mask M at input size (B x 1 x H x W; 1 = keep): 1 - dilated patch mask where
    ``flagged``, all ones elsewhere. ``extra`` (B x 1 x h x w binary, any resolution) is added to
    the patch mask of flagged images before the dilation. Only flagged images are upsampled and dilated."""
    batch = soft_mask.shape[0]
    keep = torch.ones(batch, 1, *input_size, dtype=torch.float32, device=soft_mask.device)
    index = flagged.nonzero().flatten()
    if index.numel():
        masked = patch_mask(soft_mask[index].detach(), input_size, threshold)
        if extra is not None:
            masked = torch.maximum(masked, F.interpolate(extra[index].float(), size=tuple(input_size), mode="nearest"))
        keep[index] = 1.0 - dilate_mask(masked, dilation)
    return keep


def straight_through_keep_mask(analysis: MaskEvidence, threshold: float | None, gate: bool = True,
                               extreme_threshold: float | None = None) -> torch.Tensor:
    """The defense's keep-mask (B x 1 x H x W, 1 = keep) with straight-through gradients.

    Forward: exactly Eq. 4 as the defense applies it - 1[M~ > mask threshold] upsampled (with the
    channel-extreme coverage when the defense has it), dilated by ``mask_dilation``, only on images
    that are flagged (every image with ``gate=False``). Backward: the upsampled soft mask M~ stands
    for the binary mask, and sigmoid(d - lambda0) for the flag - or, with the extreme evidence,
    1 - (1 - sigmoid(d - lambda0)) (1 - sigmoid(x - lambda_x)) for "either score fires".
    """
    size = tuple(analysis.input_size)
    soft = F.interpolate(analysis.soft_mask, size=size, mode="nearest")
    hard = (soft.detach() > analysis.mask_threshold).float()
    if analysis.coverage is not None and analysis.coverage_in_mask:
        hard = torch.maximum(hard, F.interpolate(analysis.coverage.float(), size=size, mode="nearest"))
    hard = dilate_mask(hard, analysis.mask_dilation)
    masked = hard + (soft - soft.detach())  # exactly ``hard`` forward, the soft mask's gradient backward
    if gate and threshold is not None:
        probability = torch.sigmoid(analysis.score - threshold)
        if analysis.extreme_score is not None and extreme_threshold is not None:
            probability = 1 - (1 - probability) * (1 - torch.sigmoid(analysis.extreme_score - extreme_threshold))
        flag = analysis.flagged.float() + (probability - probability.detach())
        masked = masked * flag.view(-1, 1, 1, 1)
    return 1.0 - masked


def apply_mask(images: torch.Tensor, keep: torch.Tensor, fill: float | tuple[float, ...] = 0.0) -> torch.Tensor:
    """x * M + fill * (1 - M) in the images' own dtype and device (``fill``: scalar or per channel)."""
    keep = keep.to(device=images.device, dtype=images.dtype)
    value = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    value = value.view(1, -1, 1, 1) if value.dim() else value
    return images * keep + value * (1 - keep)


def mask_iou(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of two binary B x 1 x H x W masks (values > 0.5 count as set; 0 where both are empty)."""
    predicted, true = predicted > 0.5, true > 0.5
    intersection = (predicted & true).flatten(1).sum(1).float()
    union = (predicted | true).flatten(1).sum(1).float()
    return intersection / union.clamp(min=1)


def choose_mask_threshold(soft_masks: torch.Tensor, true_masks: torch.Tensor, candidates: torch.Tensor | None = None) -> tuple[float, float]:
    """The soft-mask threshold (of ``candidates``, default 0.01 ... 0.99) whose patch masks have the
    highest mean IoU with ``true_masks`` (B x 1 x H x W, any resolution, nearest-resized to the soft
    masks'); ties go to the higher threshold. Returns (threshold, mean IoU). For training data only:
    Eq. 4's fixed 0.5 fails when a fusion block's soft mask never reaches it."""
    if soft_masks.dim() != 4 or true_masks.dim() != 4 or soft_masks.shape[0] != true_masks.shape[0] or soft_masks.shape[0] == 0:
        raise InputError(f"soft masks {tuple(soft_masks.shape)} and true masks {tuple(true_masks.shape)} must be B x 1 x H x W with the same B > 0")
    candidates = torch.linspace(0.01, 0.99, 99) if candidates is None else candidates.flatten()
    truth = F.interpolate(true_masks.float(), size=tuple(soft_masks.shape[-2:]), mode="nearest")
    scores = torch.stack([mask_iou((soft_masks > t).float(), truth).mean() for t in candidates.tolist()])
    best = int(torch.nonzero(scores == scores.max()).flatten()[-1])
    return float(candidates[best]), float(scores[best])
