"""Semantic segmentation: per-pixel cross-entropy and mIoU from a confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum


@dataclass
class ConfusionMatrix:
    """Counts (true class x predicted class) over evaluated pixels.

    ``num_classes`` classes are evaluated. A prediction outside them (e.g. a trained void class)
    lands in one extra column and counts as a miss. Pixels labelled ``ignore_index`` (or outside
    ``0..num_classes-1``) and pixels under an ignore mask (the patch) are left out.

    ``ignore_prediction``: also leave out pixels *predicted* as this index. Upstream ESPNet's CamVid
    score does this for void (11); it is off by default because under attack it would hide pixels
    that the attack pushed to void.
    """

    num_classes: int
    ignore_index: int = 255
    ignore_prediction: int | None = None
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor, ignore_mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``prediction`` and ``label`` (B x H x W integer maps), ``ignore_mask`` (B x H x W, True = skip)."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        valid = (label >= 0) & (label < self.num_classes) & (label != self.ignore_index)
        if ignore_mask is not None:
            valid &= ~ignore_mask.bool().reshape(label.shape)
        if self.ignore_prediction is not None:
            valid &= prediction != self.ignore_prediction
        prediction = prediction[valid].long().cpu()
        prediction = torch.where((prediction >= 0) & (prediction < self.num_classes), prediction, self.num_classes)
        index = label[valid].long().cpu() * (self.num_classes + 1) + prediction
        self.counts += torch.bincount(index, minlength=self.counts.numel()).view_as(self.counts).double()

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts

    def all_reduce(self) -> None:
        """Sum the counts across distributed ranks."""
        self.counts = all_reduce_sum(self.counts.clone())

    def compute(self) -> dict[str, float | list[float]]:
        """mIoU (mean over classes present in labels or predictions), pixel accuracy, per-class IoU."""
        true_positive = self.counts[:, : self.num_classes].diagonal()
        labelled = self.counts.sum(1)
        predicted = self.counts[:, : self.num_classes].sum(0)
        union = labelled + predicted - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
        total = labelled.sum()
        return {
            "miou": float(iou.nanmean()) if total > 0 else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "class_iou": [float(v) for v in iou],
        }


class SegmentationTask:
    """Adapter for a segmenter returning logits (B x K x H x W) at input resolution."""

    name = "segmentation"

    def __init__(self, model: nn.Module, num_classes: int, ignore_index: int, class_names: tuple[str, ...] = ()) -> None:
        self.model, self.num_classes, self.ignore_index, self.class_names = model, num_classes, ignore_index, class_names

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-pixel cross-entropy (B x H x W); ignored pixels get 0."""
        labels = labels.long()
        valid = (labels >= 0) & (labels < self.num_classes) & (labels != self.ignore_index)
        loss = F.cross_entropy(logits, torch.where(valid, labels, torch.zeros_like(labels)), reduction="none")
        return loss * valid

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)

    def metric(self, ignore_prediction: int | None = None) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.ignore_index, ignore_prediction)
