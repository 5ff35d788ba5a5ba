"""COCO-format detection data: an image folder plus an instances JSON.

Also reads APRICOT-style files, where the adversarial patches are annotated as their own category:
name it with ``patch_category`` and those boxes are returned separately as ``patch_boxes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import ZMaskError
from ..validation import check_limit
from .batching import dataset_length
from .io import read_image

MAX_ANNOTATION_BYTES = 2 * 1024**3


class CocoDetection(Dataset):
    """Items: ``image`` (3 x H x W in [0, 1]), ``target`` = {``boxes`` (N x 4 xyxy, pixels),
    ``labels`` (COCO category ids), ``image_id``, ``patch_boxes`` (M x 4)}, ``path``.
    Crowd annotations are kept out of ``boxes`` (COCO evaluation ignores them anyway)."""

    def __init__(
        self, images: str | Path, annotations: str | Path, patch_category: str | int | None = None, limit: int | None = None
    ) -> None:
        limit = check_limit(limit)
        self.images, self.annotation_file = Path(images), Path(annotations)
        if not self.annotation_file.is_file():
            raise ZMaskError(f"COCO annotation file {self.annotation_file} does not exist")
        if self.annotation_file.stat().st_size > MAX_ANNOTATION_BYTES:
            raise ZMaskError(f"annotation file {self.annotation_file} is larger than {MAX_ANNOTATION_BYTES} bytes")
        try:
            data = json.loads(self.annotation_file.read_text())
            records, categories = data["images"], data["categories"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ZMaskError(f"{self.annotation_file} is not a COCO instances file: {error}") from None
        self.categories = {c["id"]: c["name"] for c in categories}
        self.patch_category = _category_id(patch_category, self.categories, self.annotation_file)
        self.records = sorted(records, key=lambda r: r["id"])[:limit] if limit is not None else sorted(records, key=lambda r: r["id"])
        self._annotations: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in self.records}
        for annotation in data.get("annotations", []):
            if annotation.get("image_id") in self._annotations:
                self._annotations[annotation["image_id"]].append(annotation)
        for record in self.records:
            if not (self.images / record["file_name"]).is_file():
                raise ZMaskError(f"image {self.images / record['file_name']} listed in {self.annotation_file} does not exist")

    @property
    def image_ids(self) -> list[int]:
        return [r["id"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        path = self.images / record["file_name"]
        image = read_image(path)
        boxes, labels, patches = [], [], []
        for annotation in self._annotations[record["id"]]:
            x, y, w, h = annotation["bbox"]
            if w <= 0 or h <= 0:
                continue
            box = [x, y, x + w, y + h]
            if annotation["category_id"] == self.patch_category:
                patches.append(box)
            elif not annotation.get("iscrowd", 0):
                boxes.append(box)
                labels.append(annotation["category_id"])
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(record["id"]),
            "patch_boxes": torch.tensor(patches, dtype=torch.float32).reshape(-1, 4),
        }
        return {"image": image, "target": target, "path": str(path)}


def _category_id(category: str | int | None, categories: dict[int, str], source: Path) -> int | None:
    if category is None:
        return None
    if isinstance(category, int):
        if category not in categories:
            raise ZMaskError(f"category id {category} is not in {source}")
        return category
    matches = [cid for cid, name in categories.items() if name == category]
    if not matches:
        raise ZMaskError(f"category {category!r} is not in {source}; categories: {sorted(categories.values())[:10]}...")
    return matches[0]


def collate_detection(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keep images of different sizes as lists (torchvision's detection convention)."""
    return {key: [item[key] for item in items] for key in items[0]}


class LetterboxedDetection(Dataset):
    """A detection dataset letterboxed to a fixed ``size`` (an int for H = W, or (H, W)), boxes mapped into that frame.

    Items keep ``target`` (boxes in letterboxed pixels) and add ``letterbox`` (the geometry, to map
    predictions back to the original image).
    """

    def __init__(self, dataset: Dataset, size: int | tuple[int, int] = 640) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from .letterbox import letterbox

        item = dict(self.dataset[index])
        image, geometry = letterbox(item["image"], self.size, auto=False)
        target = dict(item["target"])
        for key in ("boxes", "patch_boxes"):
            boxes = target[key].clone()
            boxes[:, [0, 2]] = boxes[:, [0, 2]] * geometry.gain + geometry.pad_w
            boxes[:, [1, 3]] = boxes[:, [1, 3]] * geometry.gain + geometry.pad_h
            target[key] = boxes
        item.update(image=image, target=target, letterbox=geometry)
        return item
