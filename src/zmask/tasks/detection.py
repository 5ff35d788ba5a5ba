"""Object detection: COCO mAP through pycocotools, and the objective attacks optimise."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import all_gather_objects
from ..errors import ZMaskError


class CocoEvaluator:
    """Accumulates detections (torchvision format, original-image pixels, COCO category ids) and
    scores them with ``pycocotools.cocoeval.COCOeval`` (bbox). Records are gathered across ranks."""

    def __init__(self, annotation_file: str | Path) -> None:
        from pycocotools.coco import COCO

        path = Path(annotation_file)
        if not path.is_file():
            raise ZMaskError(f"COCO annotation file {path} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):
            self.ground_truth = COCO(str(path))
        self.records: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def update(self, image_ids: list[int], outputs: list[dict[str, torch.Tensor]]) -> None:
        for image_id, output in zip(image_ids, outputs):
            self.image_ids.append(int(image_id))
            boxes = output["boxes"].detach().cpu().double()
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist()):
                self.records.append({
                    "image_id": int(image_id), "category_id": int(label),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], "score": round(score, 5),
                })

    def compute(self) -> dict[str, float]:
        """COCO AP@[.5:.95], AP50 and AP75 over the images seen (on every rank)."""
        from pycocotools.cocoeval import COCOeval

        records, image_ids = all_gather_objects(self.records), sorted(set(all_gather_objects(self.image_ids)))
        if not image_ids:
            raise ZMaskError("no images were evaluated")
        if not records:
            return {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "images": len(image_ids)}
        with contextlib.redirect_stdout(io.StringIO()):
            detections = self.ground_truth.loadRes(records)
            evaluation = COCOeval(self.ground_truth, detections, "bbox")
            evaluation.params.imgIds = image_ids
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats = evaluation.stats
        return {"map": float(stats[0]), "ap50": float(stats[1]), "ap75": float(stats[2]), "images": len(image_ids)}


class DetectionTask:
    """Adapter for a detector in torchvision's format (B x 3 x H x W in [0, 1] -> list of dicts).

    ``objective(images, targets, kind)`` is the differentiable quantity an attack maximises; it is
    delegated to the model (``YOLOv5Detector.objective``, ``TorchvisionDetector.objective``).
    Targets are dicts with ``boxes`` (xyxy, input pixels) and ``labels`` (COCO category ids).
    """

    name = "detection"

    def __init__(self, model: nn.Module, annotation_file: str | Path | None = None) -> None:
        self.model, self.annotation_file = model, annotation_file

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def objective(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], kind: str = "untargeted") -> torch.Tensor:
        if not hasattr(self.model, "objective"):
            raise ZMaskError(f"{type(self.model).__name__} has no attack objective; wrap it with zmask.models.TorchvisionDetector")
        return self.model.objective(images, targets, kind)

    def metric(self) -> CocoEvaluator:
        if self.annotation_file is None:
            raise ZMaskError("detection metrics need a COCO annotation file")
        return CocoEvaluator(self.annotation_file)
