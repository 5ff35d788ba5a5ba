"""How much masking a region changes a model's output: the effect of what the mask removed.

A patch that does harm is, by definition, a patch whose removal changes the prediction. So when a
flagged frame's keep-mask is chosen among candidates (``ZMaskConfig.candidate_choice="effect"``),
the candidate whose re-pass changes the output most, away from the masked pixels, is the one
that removed the attack. An attacker who makes another region look suspicious (a decoy) gains
nothing unless masking that region changes the prediction more than removing the patch does,
that is, unless the patch's own effect is smaller than an occluder's.

:func:`output_change` reads the model output formats of :class:`zmask.contracts.ModelWrapper`:

* segmentation logits (B x K x H x W): the share of the image's pixels outside the masked region
  whose predicted class changed;
* classification logits (B x K): 1 where the top class changed;
* detections (a list of B dicts with ``boxes``, ``labels``, ``scores``): the score-weighted boxes
  of either output, with their centre outside the masked region, that the other output does not
  have (each box counts its score times one minus its best IoU with a box of the same label).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ZMaskTypeError


def output_change(before: Any, after: Any, keep: torch.Tensor) -> torch.Tensor:
    """Per image (B, float32): how much ``after`` (outputs of the images masked by ``keep``,
    B x 1 x H x W with 0 = masked) differs from ``before`` (outputs of the same images unmasked)
    away from the masked pixels. Larger is a larger change; 0 is none."""
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        if before.shape != after.shape:
            raise ZMaskTypeError(f"outputs of shapes {tuple(before.shape)} and {tuple(after.shape)} cannot be compared")
        if before.dim() == 4:
            return label_change(before, after, keep)
        if before.dim() == 2:
            return (before.argmax(1) != after.argmax(1)).float()
    if isinstance(before, list) and isinstance(after, list) and all(isinstance(item, Mapping) and "boxes" in item for item in before + after):
        if len(before) != len(after):
            raise ZMaskTypeError(f"{len(before)} and {len(after)} detection results cannot be compared")
        return torch.stack([box_change(b, a, k[0]) for b, a, k in zip(before, after, keep)]) if before else keep.new_zeros(0)
    raise ZMaskTypeError(f"cannot measure how a model output of type {type(before).__name__} changes: candidate_choice='effect' "
                         "reads segmentation logits (B x K x H x W), classification logits (B x K) or torchvision detections")


def label_change(before: torch.Tensor, after: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Share of the pixels (of the output grid) that are kept and whose arg-max class changed."""
    kept = keep.to(before.device, torch.float32)
    if tuple(kept.shape[-2:]) != tuple(before.shape[-2:]):
        kept = F.interpolate(kept, size=before.shape[-2:], mode="nearest")
    changed = (before.argmax(1, keepdim=True) != after.argmax(1, keepdim=True)).float() * (kept > 0.5)
    return changed.flatten(1).mean(1)


def box_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Score-weighted boxes (centre kept by ``keep``, H x W) of either detection result without a
    same-label match in the other: sum of score x (1 - best IoU)."""
    from torchvision.ops import box_iou

    def kept(result: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes = result["boxes"].detach().float().reshape(-1, 4)
        labels, scores = result["labels"].reshape(-1), result["scores"].detach().float().reshape(-1)
        if len(boxes) == 0:
            return boxes, labels, scores
        rows = ((boxes[:, 1] + boxes[:, 3]) / 2).long().clamp(0, int(keep.shape[-2]) - 1)
        cols = ((boxes[:, 0] + boxes[:, 2]) / 2).long().clamp(0, int(keep.shape[-1]) - 1)
        inside = keep.to(boxes.device)[rows, cols] > 0.5
        return boxes[inside], labels[inside], scores[inside]

    (boxes_b, labels_b, scores_b), (boxes_a, labels_a, scores_a) = kept(before), kept(after)
    if len(boxes_b) == 0 or len(boxes_a) == 0:
        return scores_b.sum() + scores_a.sum()
    overlap = box_iou(boxes_b, boxes_a.to(boxes_b.device)) * (labels_b.view(-1, 1) == labels_a.to(labels_b.device).view(1, -1))
    return (scores_b * (1 - overlap.amax(1))).sum() + (scores_a.to(scores_b.device) * (1 - overlap.amax(0))).sum()
