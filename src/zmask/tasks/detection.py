"""Object detection: COCO mAP through pycocotools, and the objective attacks optimise."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..contracts import AttackableDetector, Resampler, WeightedTerm
from ..distributed import all_gather_objects
from ..errors import ZMaskError
from .registry import register_task, stack_items

if TYPE_CHECKING:
    from ..config import ZMaskConfig

logger = logging.getLogger(__name__)


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
        self.keys: dict[int, int] = {}  # dataset index -> COCO image id
        self._evaluated: tuple[tuple, Any] | None = None  # (record count, image ids) -> COCOeval after evaluate()

    def update(self, image_ids: list[int], outputs: list[dict[str, torch.Tensor]], keys: Sequence[int] | None = None) -> None:
        """Add detections of images ``image_ids`` (COCO ids); ``keys`` (dataset indices) enable :meth:`resampler`."""
        if keys is not None:
            if len(keys) != len(image_ids):
                raise ZMaskError(f"{len(keys)} keys for {len(image_ids)} images")
            self.keys.update({int(key): int(image_id) for key, image_id in zip(keys, image_ids)})
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
        records, image_ids = all_gather_objects(self.records), sorted(set(all_gather_objects(self.image_ids)))
        if not image_ids:
            raise ZMaskError("no images were evaluated")
        if not records:
            return {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "images": len(image_ids)}
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            evaluation = self._evaluate(records, image_ids)
            evaluation.accumulate()  # leaves the per-image matches (evalImgs) that resampler() reuses
            evaluation.summarize()
        logger.debug("pycocotools on %d images, %d detections:\n%s", len(image_ids), len(records), printed.getvalue().rstrip())
        stats = evaluation.stats
        return {"map": float(stats[0]), "ap50": float(stats[1]), "ap75": float(stats[2]), "images": len(image_ids)}

    def _evaluate(self, records: list[dict[str, Any]], image_ids: list[int]):
        """COCOeval with its per-image matches computed, kept for the same records and images."""
        from pycocotools.cocoeval import COCOeval

        key = (len(records), tuple(image_ids))
        if self._evaluated is not None and self._evaluated[0] == key:
            return self._evaluated[1]
        detections = self.ground_truth.loadRes(records)
        evaluation = COCOeval(self.ground_truth, detections, "bbox")
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        self._evaluated = (key, evaluation)
        return evaluation

    def resampler(self) -> Resampler:
        """AP of resampled images: COCOeval's per-image matches are computed once, and each
        resample re-runs only its accumulation (area "all", the largest detection count), with
        the per-image entries of a repeated image repeated."""
        keys = dict(all_gather_objects(list(self.keys.items())))
        records, image_ids = all_gather_objects(self.records), sorted(set(all_gather_objects(self.image_ids)))
        if not keys and image_ids:
            raise ZMaskError("no dataset indices were recorded: pass keys= to CocoEvaluator.update to resample images")
        if not records:
            return Resampler(sorted(keys), lambda selection: {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "images": len(selection)})
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = self._evaluate(records, image_ids)
        evaluated = evaluation._paramsEval
        position = {image_id: i for i, image_id in enumerate(evaluated.imgIds)}
        images, areas, categories = len(evaluated.imgIds), len(evaluated.areaRng), len(evaluated.catIds)
        all_area = evaluated.areaRngLbl.index("all")
        iou_50, iou_75 = (int(np.argmin(np.abs(evaluated.iouThrs - t))) for t in (0.5, 0.75))

        def compute(selection: Sequence[int]) -> dict[str, float]:
            try:
                rows = [position[keys[int(k)]] for k in selection]
            except KeyError as error:
                raise ZMaskError(f"image {error.args[0]} was not evaluated") from None
            resampled = copy.copy(evaluation)
            params = copy.deepcopy(evaluated)
            params.imgIds, params.areaRng, params.areaRngLbl = list(range(len(rows))), [evaluated.areaRng[all_area]], ["all"]
            params.maxDets = [evaluated.maxDets[-1]]
            resampled._paramsEval = params
            resampled.evalImgs = [evaluation.evalImgs[(k * areas + all_area) * images + row] for k in range(categories) for row in rows]
            with contextlib.redirect_stdout(io.StringIO()):
                resampled.accumulate(copy.deepcopy(params))
            precision = resampled.eval["precision"][:, :, :, 0, 0]  # IoU thresholds x recall x categories

            def mean_ap(values: np.ndarray) -> float:
                values = values[values > -1]
                return float(values.mean()) if values.size else -1.0

            return {"map": mean_ap(precision), "ap50": mean_ap(precision[iou_50]), "ap75": mean_ap(precision[iou_75]), "images": len(rows)}

        return Resampler(sorted(keys), compute)


@register_task
class DetectionTask:
    """Object detection: a detector in torchvision's format (B x 3 x H x W in [0, 1] -> list of
    dicts). Dataset items carry ``target`` (``boxes`` xyxy in input pixels, ``labels`` COCO
    category ids, ``image_id``) and, when the images were letterboxed, ``letterbox`` (the geometry
    that maps predictions back to the original image for COCO scoring).

    The attack objective is the wrapper's own (:class:`~zmask.contracts.AttackableDetector`).
    """

    name: ClassVar[str] = "detection"
    metric_key: ClassVar[str] = "map"
    paper_patch_sizes: ClassVar = ((640, 640), {"L": (200, 200), "M": (150, 150), "S": (100, 100)})
    objectives: ClassVar[tuple[str, ...]] = ("untargeted", "vanishing")

    def __init__(self, model: nn.Module, annotation_file: str | Path | None = None) -> None:
        self.model, self.annotation_file = model, annotation_file

    @staticmethod
    def paper_config(shallow_layers: Sequence[str], deep_layers: Sequence[str], input_size: tuple[int, int],
                     heatmap_size: tuple[int, int] | None = None, **options: Any) -> ZMaskConfig:
        """The paper's COCO detection setting of Z-Mask (``ZMaskConfig.for_detection``)."""
        from ..config import ZMaskConfig

        return ZMaskConfig.for_detection(shallow_layers, deep_layers, input_size, heatmap_size, **options)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return stack_items(items, ("image",), ("target", "letterbox"))

    def objective(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], kind: str = "untargeted") -> torch.Tensor:
        """The wrapper's differentiable objective (to maximise)."""
        if not isinstance(self.model, AttackableDetector):
            raise ZMaskError(f"{type(self.model).__name__} offers no attack objective (see zmask.contracts.AttackableDetector); "
                             "wrap it with zmask.models.TorchvisionDetector")
        if kind not in self.model.objectives:
            raise ZMaskError(f"{type(self.model).__name__} has no attack objective {kind!r}; use one of {self.model.objectives}")
        return self.model.objective(images, targets, kind)

    def attack_terms(self, output: Any, batch: Mapping[str, Any], images: torch.Tensor, patch_masks: torch.Tensor,
                     weight: float, objective: str = "untargeted") -> dict[str, WeightedTerm]:
        targets = [{k: v.to(images.device) if torch.is_tensor(v) else v for k, v in target.items()} for target in batch["target"]]
        return {"detection": (weight, -self.objective(images, targets, objective))}

    def metric(self) -> CocoEvaluator:
        if self.annotation_file is None:
            raise ZMaskError("detection metrics need a COCO annotation file")
        return CocoEvaluator(self.annotation_file)

    def update_metric(self, accumulator: CocoEvaluator, output: list[dict[str, torch.Tensor]], batch: Mapping[str, Any],
                      patch_masks: torch.Tensor) -> None:
        """COCO scoring in original-image pixels (patch pixels cannot be left out of box metrics)."""
        from ..data.letterbox import scale_boxes

        mapped = []
        geometries = batch.get("letterbox") or [None] * len(output)
        for detections, geometry in zip(output, geometries):
            detections = dict(detections)
            boxes = detections["boxes"].detach().cpu()
            detections["boxes"] = scale_boxes(boxes, geometry) if geometry is not None else boxes
            mapped.append(detections)
        accumulator.update([target["image_id"] for target in batch["target"]], mapped, keys=batch.get("index"))

    def render(self, axis: Any, image: torch.Tensor, output: dict[str, torch.Tensor], min_score: float = 0.25) -> None:
        from matplotlib.patches import Rectangle

        axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        keep = output["scores"] > min_score
        for x1, y1, x2, y2 in output["boxes"][keep].tolist():
            axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", linewidth=1))

    def overlay(self, image: torch.Tensor, output: list[dict[str, torch.Tensor]], min_score: float = 0.25) -> torch.Tensor:
        from torchvision.utils import draw_bounding_boxes

        detections = output[0]
        keep = detections["scores"].detach().cpu() > min_score
        pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
        drawn = draw_bounding_boxes(pixels, detections["boxes"].detach().cpu()[keep], colors="yellow", width=2)
        return drawn.float() / 255
