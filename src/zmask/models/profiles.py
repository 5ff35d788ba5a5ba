"""Fitted profiles shipped inside the package, described like torchvision's weights enums.

A :class:`ProfileRecord` names a profile file in ``zmask/profiles/``, its SHA-256, the data it was
fitted on, the figures measured with it and the command that regenerates it. A preset that has one
(``ModelPreset.profile_record``) gives the verified file with ``preset.profile()``, and
``ZMask.from_preset(name)`` loads it onto the preset's model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..errors import ProfileError

logger = logging.getLogger(__name__)

#: Where the shipped profiles live (package data, in the wheel as in a checkout).
PROFILE_FOLDER = Path(__file__).resolve().parents[1] / "profiles"


@dataclass(frozen=True)
class ProfileRecord:
    """A shipped, fitted profile and what is known about it.

    ``file``: name in ``zmask/profiles/``; ``sha256``: of the whole file, checked before use;
    ``fitted_on``: the data and split sizes; ``metrics``: figures measured with this profile
    (metadata only, nothing reads them to decide anything); ``command``: regenerates the file
    from the repository root; ``report``: where the measured figures are written up.
    """

    file: str
    sha256: str
    fitted_on: str
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)
    command: str = ""
    report: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    @property
    def path(self) -> Path:
        """Where the file is expected (not verified; see :meth:`verified_path`)."""
        return PROFILE_FOLDER / self.file

    def verified_path(self) -> Path:
        """The file's path once its SHA-256 matches the record; ``ProfileError`` otherwise."""
        from ..assets import sha256_of

        path = self.path
        if not path.is_file():
            raise ProfileError(f"shipped profile {path} is missing from this installation; reinstall zmask or regenerate it ({self.command})")
        found = sha256_of(path)
        if found != self.sha256:
            raise ProfileError(
                f"shipped profile {path} has SHA-256 {found}, expected {self.sha256}: it was changed or regenerated; "
                "restore the shipped file, or pass the new one explicitly (--profile / ZMask.load)"
            )
        logger.debug("shipped profile %s verified (sha256 %s)", path, found)
        return path


ESPNET_CAMVID_PROFILE = ProfileRecord(
    "espnet_camvid.safetensors",
    "151b4f9911e80402939dc44938ea5488dd8823c462314af4a43540c3dd0a619e",
    "CamVid train (SegNet split, 360x480): clean statistics on 120 images, the fusion block on 120 others with the six "
    "committed L patches (beta 0.5-1.0, src/zmask/patches/espnet_camvid_L_beta*.png), lambda0 by ROC on 80 more; heatmap "
    "grid 45x60, the finest within 1.25x the forward (--max-overhead 0.25); seed 0",
    {
        "lambda0": 0.1559, "calibration_auc": 1.000,
        "val_miou_clean": 0.701, "val_miou_L_patch": 0.301, "val_miou_L_patch_zmask": 0.639, "val_auc_L_patch": 1.000,
    },
    "zmask fit --config experiments/espnet_camvid_fit.yaml",
    "README, 'Patches' and 'Evaluation'; CamVid val (101 images)",
)

YOLOV5N_COCO_PROFILE = ProfileRecord(
    "yolov5n_coco.safetensors",
    "347bd3fda3baab3f35fdca24e4812638f01cfa96eee9d411ced465318d2f702d",
    "coco_tiny train2017 (80 images, letterboxed 640x640): clean statistics on 35 images, the fusion block on 30 others "
    "and lambda0 on 15 more, each fusion/calibration image drawn 8 times, with the six committed L patches "
    "(src/zmask/patches/yolov5n_coco_L*.png), 300 epochs; half of the clean samples carry a harmless occluder (noise or a "
    "crop of another image) labelled 'no patch'; lambda0 at <= 5% false alarms on the plain and on the occluded "
    "calibration negatives each; heatmap grid 80x80, the finest within 1.25x the forward (--max-overhead 0.25); "
    "soft-mask threshold calibrated; seed 0",
    {
        "lambda0": 0.2438, "val_map_clean": 0.309, "val_map_L_patch": 0.134, "val_map_L_patch_zmask": 0.216,
        "val_map_random_L": 0.236, "val_auc_L_patch": 1.000, "val_tpr_L_patch": 1.000, "val_clean_flag_rate": 0.000,
        "val_random_noise_flag_rate": 0.013, "val_mask_iou_L_patch": 0.917, "val_recovery_L_patch": 0.472,
    },
    "zmask fit --config experiments/yolov5n_coco_fit.yaml",
    "docs/results/yolov5n_coco/summary.md; coco_tiny val2017 (80 images)",
)
