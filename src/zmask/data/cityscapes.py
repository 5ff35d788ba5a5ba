"""Cityscapes in its standard layout (``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
``gtFine/{split}/{city}/*_gtFine_labelIds.png``), labels mapped to the 19 trainIds (255 = ignore)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ZMaskError
from ..validation import check_limit
from .io import read_image, read_label

CITYSCAPES_IGNORE_INDEX = 255
# labelId -> trainId for the 19 evaluated classes (everything else is ignored).
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def label_ids_to_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    lookup = torch.full((256,), CITYSCAPES_IGNORE_INDEX, dtype=torch.int64)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lookup[label_id] = train_id
    return lookup[label_ids.clamp(0, 255)]


class Cityscapes(Dataset):
    """Items: ``image`` (3 x H x W in [0, 1]), ``label`` (trainIds, 255 = ignore), ``path``.

    ``size`` (H, W) resizes images bilinearly and labels with nearest neighbour (e.g. (512, 1024)).
    """

    def __init__(self, root: str | Path, split: str = "val", size: tuple[int, int] | None = None, limit: int | None = None) -> None:
        limit = check_limit(limit)
        self.root = Path(root)
        image_root = self.root / "leftImg8bit" / split
        if not image_root.is_dir():
            raise ZMaskError(f"Cityscapes folder {image_root} does not exist; expected leftImg8bit/{split}/<city>/*.png")
        images = sorted(image_root.glob("*/*_leftImg8bit.png"))
        if not images:
            raise ZMaskError(f"no *_leftImg8bit.png images under {image_root}")
        self.pairs = []
        for image in images:
            label = self.root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            if not label.is_file():
                raise ZMaskError(f"Cityscapes label file {label} for image {image} does not exist")
            self.pairs.append((image, label))
        self.pairs = self.pairs[:limit] if limit is not None else self.pairs
        self.size = size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), label_ids_to_train_ids(read_label(label_path))
        if self.size is not None and tuple(image.shape[1:]) != tuple(self.size):
            image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
            label = F.interpolate(label[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return {"image": image, "label": label, "path": str(image_path)}
