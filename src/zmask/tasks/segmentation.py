"""Semantic segmentation: per-pixel cross-entropy and mIoU from a confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..contracts import Resampler, WeightedTerm
from ..distributed import all_gather_objects, all_reduce_sum
from ..errors import InputError
from .registry import register_task, stack_items

if TYPE_CHECKING:
    from ..config import ZMaskConfig


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
    per_image: dict[int, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor, ignore_mask: torch.Tensor | None = None,
               keys: Sequence[int] | None = None) -> None:
        """Add a batch: ``prediction`` and ``label`` (B x H x W integer maps), ``ignore_mask`` (B x H x W, True = skip).

        With ``keys`` (one dataset index per image) each image's counts are also kept, for
        :meth:`resampler`.
        """
        if prediction.shape != label.shape:
            raise InputError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        if keys is not None and len(keys) != label.shape[0]:
            raise InputError(f"{len(keys)} keys for a batch of {label.shape[0]} images")
        valid = (label >= 0) & (label < self.num_classes) & (label != self.ignore_index)
        if ignore_mask is not None:
            valid &= ~ignore_mask.bool().reshape(label.shape)
        if self.ignore_prediction is not None:
            valid &= prediction != self.ignore_prediction
        cells = self.counts.numel()
        prediction = torch.where((prediction >= 0) & (prediction < self.num_classes), prediction.long(), self.num_classes)
        index = label.long() * (self.num_classes + 1) + prediction
        if keys is None:
            self.counts += torch.bincount(index[valid].cpu(), minlength=cells).view_as(self.counts).double()
            return
        for key, image_index, image_valid in zip(keys, index, valid):
            counts = torch.bincount(image_index[image_valid].cpu(), minlength=cells).view_as(self.counts).double()
            self.counts += counts
            key = int(key)
            self.per_image[key] = self.per_image[key] + counts if key in self.per_image else counts

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts
        for key, counts in other.per_image.items():
            self.per_image[key] = self.per_image[key] + counts if key in self.per_image else counts.clone()

    def all_reduce(self) -> None:
        """Sum the counts across distributed ranks (in place)."""
        self.counts = all_reduce_sum(self.counts.clone())

    def compute(self) -> dict[str, float | list[float]]:
        """mIoU (mean over classes present in labels or predictions), pixel accuracy, per-class IoU,
        over the counts of every ``torch.distributed`` rank (the local counts are left as they are)."""
        return self.scores(all_reduce_sum(self.counts.clone()))

    def resampler(self) -> Resampler:
        """The metric of resampled images, from the per-image counts of every rank (``update(keys=...)``)."""
        images = dict(all_gather_objects(list(self.per_image.items())))
        if not images and self.counts.sum() > 0:
            raise InputError("no per-image counts were kept: pass keys= to ConfusionMatrix.update to resample images")
        keys = sorted(images)
        stacked = torch.stack([images[k] for k in keys]) if keys else self.counts[None] * 0
        position = {key: i for i, key in enumerate(keys)}

        def compute(selection: Sequence[int]) -> dict[str, float | list[float]]:
            try:
                rows = torch.tensor([position[int(k)] for k in selection], dtype=torch.long)
            except KeyError as error:
                raise InputError(f"image {error.args[0]} was not evaluated") from None
            return self.scores(stacked.index_select(0, rows).sum(0))

        return Resampler(keys, compute)

    def scores(self, counts: torch.Tensor) -> dict[str, float | list[float]]:
        """mIoU, pixel accuracy and per-class IoU of a (true x predicted) count matrix."""
        true_positive = counts[:, : self.num_classes].diagonal()
        labelled = counts.sum(1)
        predicted = counts[:, : self.num_classes].sum(0)
        union = labelled + predicted - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
        total = labelled.sum()
        return {
            "miou": float(iou.nanmean()) if total > 0 else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "class_iou": [float(v) for v in iou],
        }


def segmentation_untargeted_terms(
    logits: torch.Tensor, labels: torch.Tensor, patch_masks: torch.Tensor, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Nesti et al.'s untargeted loss split: (L_nm, L_m, gamma), both sums to be maximised.

    Omega: labelled pixels outside the patch; L_nm sums cross-entropy over the pixels of Omega
    still classified correctly, L_m over the rest; gamma = |correct| / |Omega|.
    """
    labels = labels.long()
    outside = patch_masks[:, 0] < 0.5
    valid = outside & (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    cross_entropy = F.cross_entropy(logits, safe_labels, reduction="none")
    correct = valid & (logits.argmax(1) == labels)
    wrong = valid & ~correct
    total = int(valid.sum())
    gamma = float(correct.sum()) / total if total else 0.0
    return (cross_entropy * correct).sum(), (cross_entropy * wrong).sum(), gamma


def check_label_map(label_map: Sequence[int], num_classes: int, ignore_index: int) -> tuple[int, ...]:
    """``label_map`` as a tuple after checking it: one entry per model output, each an evaluated
    class (``0..num_classes-1``) or ``ignore_index`` (an output that is never scored)."""
    if isinstance(label_map, (str, bytes)) or not isinstance(label_map, Sequence) or not label_map:
        raise InputError(f"label_map must be a non-empty sequence of class indices (one per model output), got {label_map!r}")
    entries = []
    for output, target in enumerate(label_map):
        if isinstance(target, bool) or not isinstance(target, int):
            raise InputError(f"label_map[{output}] must be an int class index, got {target!r}")
        if not (0 <= target < num_classes or target == ignore_index):
            raise InputError(f"label_map[{output}] = {target} is neither an evaluated class (0..{num_classes - 1}) "
                             f"nor the ignore index {ignore_index}")
        entries.append(int(target))
    return tuple(entries)


def describe_label_map(label_map: Sequence[int], output_names: Sequence[str] = (), class_names: Sequence[str] = (),
                       ignore_index: int = 255) -> list[str]:
    """One line per evaluated class (and one for ignored outputs): ``"Road <- road"``,
    ``"Car <- car, truck, bus, train"``, ``"(ignored) <- background"``; outputs and classes are
    named where names are given, else numbered."""
    def output_name(index: int) -> str:
        return output_names[index] if index < len(output_names) else str(index)

    targets = sorted(set(label_map), key=lambda t: (t == ignore_index, t))
    lines = []
    for target in targets:
        sources = ", ".join(output_name(i) for i, t in enumerate(label_map) if t == target)
        name = "(ignored)" if target == ignore_index else (class_names[target] if target < len(class_names) else str(target))
        lines.append(f"{name} <- {sources}")
    return lines


PALETTE_CAMVID = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
)


def colorize(prediction: torch.Tensor, palette: Sequence[tuple[int, int, int]] = PALETTE_CAMVID) -> torch.Tensor:
    """H x W class map -> H x W x 3 uint8 colours (classes past the palette take its last colour)."""
    table = torch.tensor(palette, dtype=torch.uint8)
    return table[prediction.long().clamp(0, len(palette) - 1)]


@register_task
class SegmentationTask:
    """Semantic segmentation: a segmenter returning logits (B x K x H x W) at input resolution;
    dataset items carry ``label`` (H x W class indices, ``ignore_index`` = unlabelled).

    ``label_map``: for a model trained on another label set, the dataset class of each of its K
    outputs (``ignore_index`` for outputs that are never scored), e.g. Cityscapes trainIds -> CamVid
    (:data:`zmask.data.camvid.CITYSCAPES_TO_CAMVID`). Predictions are the mapped argmax (the
    upstream protocol), so the metric, drawings and overlays are in dataset classes; the attack
    losses use :meth:`class_logits`, the log of the summed probabilities of each class's outputs.
    Without it, output k is class k.
    """

    name: ClassVar[str] = "segmentation"
    metric_key: ClassVar[str] = "miou"
    # (width, height) of the paper's patches at its 2048 x 1024 input, as (H, W) pairs here.
    paper_patch_sizes: ClassVar = ((1024, 2048), {"L": (300, 600), "M": (200, 400), "S": (150, 300)})
    objectives: ClassVar[tuple[str, ...]] = ("untargeted",)

    def __init__(self, model: nn.Module, num_classes: int, ignore_index: int, class_names: tuple[str, ...] = (),
                 ignore_prediction: int | None = None, label_map: Sequence[int] | None = None) -> None:
        self.model, self.num_classes, self.ignore_index, self.class_names = model, num_classes, ignore_index, class_names
        self.ignore_prediction = ignore_prediction
        self.label_map = None if label_map is None else check_label_map(label_map, num_classes, ignore_index)
        self._lookup = None if self.label_map is None else torch.tensor(self.label_map, dtype=torch.long)

    def _check_outputs(self, logits: torch.Tensor) -> None:
        if self.label_map is not None and (logits.dim() < 2 or logits.shape[1] != len(self.label_map)):
            raise InputError(f"the label map has {len(self.label_map)} entries (one per model output) but the model "
                             f"returned {tuple(logits.shape)}; expected B x {len(self.label_map)} x H x W logits")

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the dataset's classes (B x C x H x W): the model's own without a label map;
        with one, column c is the log-sum-exp of the outputs mapped to c, so that its softmax is
        the summed probability of those outputs (C = num_classes, plus one last column for the
        ignored outputs if any; a class no output maps to gets the lowest finite value)."""
        if self.label_map is None:
            return logits
        self._check_outputs(logits)
        columns = self.num_classes + (1 if self.ignore_index in self.label_map else 0)
        merged = []
        for target in range(columns):
            source = self.ignore_index if target == self.num_classes else target
            outputs = [i for i, t in enumerate(self.label_map) if t == source]
            merged.append(logits[:, outputs].logsumexp(1) if outputs else torch.full_like(logits[:, 0], torch.finfo(logits.dtype).min))
        return torch.stack(merged, 1)

    def _attack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with the classes that no output maps to set to ``ignore_index`` (nothing to attack there)."""
        if self.label_map is None:
            return labels.long()
        reachable = torch.zeros(self.num_classes + 1, dtype=torch.bool, device=labels.device)
        reachable[[t for t in set(self.label_map) if t < self.num_classes]] = True
        labels = labels.long()
        inside = (labels >= 0) & (labels < self.num_classes)
        keep = inside & reachable[torch.where(inside, labels, torch.full_like(labels, self.num_classes))]
        return torch.where(keep | ~inside, labels, torch.full_like(labels, self.ignore_index))

    @staticmethod
    def paper_config(shallow_layers: Sequence[str], deep_layers: Sequence[str], input_size: tuple[int, int],
                     heatmap_size: tuple[int, int] | None = None, **options: Any) -> ZMaskConfig:
        """The paper's segmentation setting of Z-Mask (``ZMaskConfig.for_segmentation``)."""
        from ..config import ZMaskConfig

        return ZMaskConfig.for_segmentation(shallow_layers, deep_layers, input_size, heatmap_size, **options)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return stack_items(items, ("image", "label"))

    def pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-pixel cross-entropy (B x H x W) over :meth:`class_logits`; ignored pixels get 0."""
        logits, labels = self.class_logits(logits), self._attack_labels(labels)
        valid = (labels >= 0) & (labels < self.num_classes) & (labels != self.ignore_index)
        loss = F.cross_entropy(logits, torch.where(valid, labels, torch.zeros_like(labels)), reduction="none")
        return loss * valid

    def attack_terms(self, output: torch.Tensor, batch: Mapping[str, Any], images: torch.Tensor, patch_masks: torch.Tensor,
                     weight: float, objective: str = "untargeted") -> dict[str, WeightedTerm]:
        """Nesti et al.'s untargeted attack: maximise the cross-entropy outside the patch, the pixels
        still correct and the ones already wrong as two terms balanced by gamma (spec 4.2)."""
        if objective not in self.objectives:
            raise InputError(f"segmentation has no attack objective {objective!r}; use one of {self.objectives}")
        labels = self._attack_labels(batch["label"].to(output.device))
        correct, wrong, gamma = segmentation_untargeted_terms(self.class_logits(output), labels, patch_masks, self.num_classes,
                                                              self.ignore_index)
        pixels = max(1, int(labels.numel()))
        return {"ce_correct": (weight * gamma, -correct / pixels), "ce_wrong": (weight * (1.0 - gamma), -wrong / pixels)}

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class map (B x H x W) of B x K x H x W logits: the argmax, through the label map if any."""
        prediction = logits.argmax(1)
        if self._lookup is None:
            return prediction
        self._check_outputs(logits)
        return self._lookup.to(prediction.device)[prediction]

    def metric(self, ignore_prediction: int | None = None) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.ignore_index, ignore_prediction if ignore_prediction is not None else self.ignore_prediction)

    def update_metric(self, accumulator: ConfusionMatrix, output: torch.Tensor, batch: Mapping[str, Any], patch_masks: torch.Tensor) -> None:
        accumulator.update(self.predict(output).cpu(), batch["label"], ignore_mask=patch_masks[:, 0].cpu() > 0.5, keys=batch.get("index"))

    def render(self, axis: Any, image: torch.Tensor, output: torch.Tensor) -> None:
        axis.imshow(colorize(self.predict(output[None])[0].cpu() if output.dim() == 3 else output).numpy())

    def overlay(self, image: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        colours = colorize(self.predict(output)[0].cpu()).permute(2, 0, 1).float() / 255
        return 0.5 * image.detach().cpu().float() + 0.5 * colours
