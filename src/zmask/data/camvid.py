"""CamVid in the SegNet layout: ``{split}.txt`` lists "image label" pairs relative to the root.

Labels are the 11 CamVid ids of :data:`CAMVID_CLASSES` and 11 = void. A model trained on another
label set is evaluated here through a declared label map (one CamVid id per model output, e.g.
:data:`CITYSCAPES_TO_CAMVID`), which the segmentation task applies to predictions before the metric.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ZMaskError
from ..validation import check_limit
from .io import read_image, read_label

CAMVID_IGNORE_INDEX = 11

#: The evaluated classes, by CamVid id.
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist")

#: Cityscapes trainIds 0..18 (road, sidewalk, building, wall, fence, pole, traffic light, traffic
#: sign, vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle), then
#: 19, the "background" output of the EdgeNets Cityscapes models, -> CamVid ids (11 = void, not
#: evaluated). The map of the upstream EdgeNets CamVid evaluation (assets ``reference/*_reference.json``).
CITYSCAPES_TO_CAMVID = (3, 4, 1, 1, 7, 2, 6, 6, 5, 5, 0, 9, 10, 8, 8, 8, 8, 10, 10, CAMVID_IGNORE_INDEX)


class CamVid(Dataset):
    """Items are dicts: ``image`` (3 x H x W in [0, 1]), ``label`` (H x W int64, 11 = void), ``path``.

    ``classes`` names the label ids 0..10 and ``ignore_index`` is void (11).
    """

    classes: tuple[str, ...] = CAMVID_CLASSES
    ignore_index: int = CAMVID_IGNORE_INDEX

    def __init__(self, root: str | Path, split: str = "train", limit: int | None = None) -> None:
        limit = check_limit(limit)
        self.root = Path(root)
        listing = self.root / f"{split}.txt"
        if not listing.is_file():
            raise ZMaskError(f"CamVid list {listing} does not exist; expected the SegNet layout with {split}.txt")
        pairs = []
        for number, line in enumerate(listing.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ZMaskError(f"{listing}:{number}: expected 'image label', got {line!r}")
            pairs.append(tuple(self.root / part.lstrip("/").removeprefix("SegNet/CamVid/") for part in parts))
        for image, label in pairs:
            if not label.is_file():
                raise ZMaskError(f"CamVid label file {label} (listed in {listing}) does not exist")
            if not image.is_file():
                raise ZMaskError(f"CamVid image {image} (listed in {listing}) does not exist")
        self.pairs = pairs[:limit] if limit is not None else pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[1:] != label.shape:
            raise ZMaskError(f"image {image_path} is {tuple(image.shape[1:])} but its label {label_path} is {tuple(label.shape)}")
        return {"image": image, "label": label, "path": str(image_path)}
