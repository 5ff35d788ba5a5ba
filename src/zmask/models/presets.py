"""Model presets: how to build each supported model, which layers Z-Mask reads in it, and the data,
preprocessing and task that go with it. Found by name in :data:`PRESETS` (``register_preset``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..config import ZMaskConfig
from ..contracts import Task
from ..errors import ConfigError, ProfileError, ZMaskError
from ..registry import Registry
from ..tasks import TASKS, DetectionTask, SegmentationTask
from ..tasks.registry import is_preset_task
from .espnet import ESPNET_VARIANTS, espnet
from .profiles import ESPNET_CAMVID_PROFILE, YOLOV5N_COCO_PROFILE, ProfileRecord
from .torchvision_models import build_detector, build_segmenter
from .yolov5 import letterbox, yolov5n

MASK_DILATION = 8

DatasetFactory = Callable[[str, "int | None", "str | Path | None"], Dataset]
TaskFactory = Callable[["ModelPreset", nn.Module, str, "str | Path | None"], Task]


def _resize_to_input(preset: ModelPreset, image: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Bilinear resize to the preset's input size (segmentation presets)."""
    if tuple(image.shape[1:]) == tuple(preset.input_size):
        return image, None
    resized = F.interpolate(image[None], size=preset.input_size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return resized, f"resized to {preset.input_size[0]}x{preset.input_size[1]}"


def _letterbox_to_input(preset: ModelPreset, image: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Letterbox to the preset's input size (detection presets)."""
    boxed, _ = letterbox(image, (preset.input_size[0], preset.input_size[1]), auto=False)
    return boxed, "letterboxed"


def _segmentation_task(preset: ModelPreset, model: nn.Module, split: str, root: str | Path | None) -> Task:
    return SegmentationTask(model, preset.num_classes, preset.ignore_index, preset.class_names, label_map=preset.label_map)


def camvid_at(size: tuple[int, int]) -> DatasetFactory:
    """CamVid (360 x 480) resized to ``size`` (H, W): images bilinear, labels nearest; for networks
    that need other sides (e.g. multiples of 16)."""
    def build(split: str, limit: int | None, root: str | Path | None) -> Dataset:
        from ..data import ResizedSegmentation

        return ResizedSegmentation(_camvid(split, limit, root), size)

    return build


def _coco_paths(split: str, root: str | Path | None) -> tuple[Path, Path]:
    from ..assets import asset_path

    folder = Path(root) if root else asset_path("coco_tiny")
    year_split = {"train": "train2017", "val": "val2017"}.get(split, split)
    return folder / year_split, folder / "annotations" / f"instances_{year_split}.json"


def _coco_task(preset: ModelPreset, model: nn.Module, split: str, root: str | Path | None) -> Task:
    return DetectionTask(model, _coco_paths(split, root)[1])


def _camvid(split: str, limit: int | None, root: str | Path | None) -> Dataset:
    from ..assets import asset_path
    from ..data import CamVid

    return CamVid(root or asset_path("camvid"), split, limit=limit)


def _coco_letterboxed(size: tuple[int, int]) -> DatasetFactory:
    def build(split: str, limit: int | None, root: str | Path | None) -> Dataset:
        from ..data import CocoDetection, LetterboxedDetection

        images, annotations = _coco_paths(split, root)
        return LetterboxedDetection(CocoDetection(images, annotations, limit=limit), size)

    return build


@dataclass(frozen=True)
class ModelPreset:
    """A known model: builder, task, input size, Z-Mask layers, and its data.

    ``build(pretrained)`` returns the model in its wrapper (:class:`~zmask.contracts.ModelWrapper`:
    RGB in [0, 1] in). Layer names are relative to that wrapper, ready for
    :class:`zmask.ZMaskConfig`. ``task`` names a registered task (``zmask.tasks.TASKS``);
    ``datasets`` builds the preset's data (split, limit, root folder), ``make_task`` its task
    object, ``prepare`` maps an arbitrary image to the model's input (resize or letterbox).
    ``profile_record`` describes the fitted profile shipped for this preset, if any
    (:class:`~zmask.models.profiles.ProfileRecord`; :meth:`profile` gives its verified path).
    ``label_map`` (segmentation): for a model trained on another label set, the dataset class of
    each model output (``ignore_index`` = never scored), applied to predictions before the metric
    (:class:`~zmask.tasks.SegmentationTask`); ``output_classes`` names the model's own outputs.
    """

    name: str
    task: str
    description: str
    build: Callable[[bool], nn.Module]
    input_size: tuple[int, int]
    shallow_layers: tuple[str, ...]
    deep_layers: tuple[str, ...]
    heatmap_size: tuple[int, int]
    num_classes: int = 0
    ignore_index: int = 255
    class_names: tuple[str, ...] = ()
    pretrained_source: str = ""
    config_overrides: tuple[tuple[str, object], ...] = ()
    datasets: DatasetFactory | None = None
    make_task: TaskFactory = _segmentation_task
    prepare: Callable[[ModelPreset, torch.Tensor], tuple[torch.Tensor, str | None]] = _resize_to_input
    train_split: str = "train"
    eval_split: str = "val"
    profile_record: ProfileRecord | None = None
    label_map: tuple[int, ...] | None = None
    output_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.label_map is not None:
            from ..tasks.segmentation import check_label_map

            check_label_map(self.label_map, self.num_classes, self.ignore_index)
            if self.output_classes and len(self.output_classes) != len(self.label_map):
                raise ZMaskError(f"preset {self.name!r}: {len(self.output_classes)} output class names for a label map of "
                                 f"{len(self.label_map)} entries")

    def label_map_lines(self) -> list[str]:
        """The label map, one line per dataset class (``"Car <- car, truck, bus, train"``); empty without one."""
        if self.label_map is None:
            return []
        from ..tasks.segmentation import describe_label_map

        return describe_label_map(self.label_map, self.output_classes, self.class_names, self.ignore_index)

    @property
    def task_type(self) -> type[Task]:
        return TASKS.get(self.task)

    def config(self, **overrides: Any) -> ZMaskConfig:
        """The paper's setting scaled to this model's input and heatmap size, with the preset's own
        choices (``config_overrides``) and then the caller's ``overrides`` applied."""
        task_type = self.task_type
        if not is_preset_task(task_type):
            raise ConfigError(f"preset {self.name!r}: its task {self.task!r} gives no paper configuration "
                              "(a paper_config staticmethod, zmask.contracts.PresetTask)")
        base = task_type.paper_config(self.shallow_layers, self.deep_layers, self.input_size, heatmap_size=self.heatmap_size)
        return base.replace(**{**dict(self.config_overrides), **overrides})

    def dataset(self, split: str, limit: int | None = None, root: str | Path | None = None) -> Dataset:
        """The preset's dataset split at its input size (``root``: another copy of the same layout)."""
        if self.datasets is None:
            raise ZMaskError(f"preset {self.name!r} has no dataset of its own; pass a data folder (--data)")
        return self.datasets(split, limit, root)

    def task_for(self, model: nn.Module, split: str | None = None, root: str | Path | None = None) -> Task:
        """The task object (attack objective, metric) for ``model`` on ``split`` of the preset's data."""
        return self.make_task(self, model, split or self.eval_split, root)

    def prepare_image(self, image: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        """(model input, a note on what was done or None) for a 3 x H x W image in [0, 1]."""
        return self.prepare(self, image)

    def profile(self) -> Path:
        """Path of the profile shipped for this preset, its SHA-256 checked (``ProfileError`` if it
        has none, or the file is missing or changed)."""
        if self.profile_record is None:
            raise ProfileError(f"{self.name!r} has no shipped profile; fit one with `zmask fit --model {self.name} ...` "
                               "and pass it (--profile / ZMask.load)")
        return self.profile_record.verified_path()

    def patch_size(self, size: str) -> tuple[int, int]:
        """(height, width) of the paper's S/M/L patch scaled to this preset's input."""
        from ..attacks.sizes import patch_size

        return patch_size(self.task_type, size, self.input_size)


PRESETS: Registry[ModelPreset] = Registry("model preset")


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Make ``preset`` available by its name (``zmask --model NAME``, :func:`get_preset`)."""
    return PRESETS.register(preset.name)(preset)


def get_preset(name: str) -> ModelPreset:
    return PRESETS.get(name)


def _espnet_preset(dataset: str, datasets: DatasetFactory | None, profile_record: ProfileRecord | None = None) -> ModelPreset:
    variant = ESPNET_VARIANTS[dataset]
    height, width = variant.input_size
    return ModelPreset(
        f"espnet_{dataset}", SegmentationTask.name, f"ESPNet p=2 q=8 trained on {dataset} (project definition, upstream weights)",
        lambda pretrained: espnet(dataset, pretrained=pretrained), variant.input_size,
        # Chosen by per-layer separability on CamVid train with beta = 0.5 patches (README, "Layer
        # choice"): the 1/2, 1/4 and 1/8 resolution blocks that localise best as S; with the
        # deepest fused features (b3) as context in D.
        ("net.encoder.b1", "net.encoder.b2", "net.encoder.level3_0"),
        ("net.encoder.b1", "net.encoder.b3", "net.encoder.b2"),
        (height // 4, width // 4), variant.classes - 1, variant.ignore_index, variant.class_names[:-1],
        f"asset {variant.asset}",
        # Chosen on CamVid train images held out from fitting (README, "Masking settings"): aligned
        # pooling (our fusion block is trained, so the authors' stretch is not needed), the
        # dataset's mean colour as fill (as the authors' demo), and a dilated mask.
        (("pooling", "same"), ("fill_value", tuple(v / 255 for v in reversed(variant.mean_bgr))), ("mask_dilation", MASK_DILATION)),
        datasets=datasets, profile_record=profile_record,
    )


def _detector_preset(name: str, input_size, shallow, deep, description) -> ModelPreset:
    return ModelPreset(
        name, DetectionTask.name, description, lambda pretrained: build_detector(name, pretrained), input_size,
        tuple(f"model.{layer}" for layer in shallow), tuple(f"model.{layer}" for layer in deep),
        (input_size[0] // 2, input_size[1] // 2), pretrained_source="torchvision weights enum (downloads)",
        datasets=_coco_letterboxed(input_size), make_task=_coco_task, prepare=_letterbox_to_input,
    )


def _segmenter_preset(name: str, shallow, deep, description) -> ModelPreset:
    return ModelPreset(
        name, SegmentationTask.name, description, lambda pretrained: build_segmenter(name, pretrained), (512, 1024),
        tuple(f"model.{layer}" for layer in shallow), tuple(f"model.{layer}" for layer in deep), (128, 256), 21, 255,
        pretrained_source="torchvision weights enum (downloads)",
    )


_RESNET_FPN_S = ("backbone.body.relu", "backbone.body.conv1", "backbone.body.layer1.0.conv1")
_RESNET_FPN_D = ("backbone.body.conv1", "backbone.body.layer4", "backbone.body.layer1.0.conv1")

for _preset in (
    _espnet_preset("camvid", _camvid, ESPNET_CAMVID_PROFILE),
    _espnet_preset("cityscapes", None),
    ModelPreset(
        "yolov5n_coco", DetectionTask.name, "YOLOv5n v6.1 on COCO (project definition, upstream weights)",
        # COCO evaluation thresholds (the reference mAP protocol); draw with score > 0.25.
        lambda pretrained: yolov5n(pretrained=pretrained, conf_threshold=0.001, iou_threshold=0.6, max_det=300), (640, 640),
        # Per-layer separability on coco_tiny train: only the 1/4-resolution blocks separate
        # patched from clean images (model.1 AUC 1.00, model.2 0.97); deep layers do not (< 0.6).
        ("net.model.1", "net.model.2"), ("net.model.1", "net.model.2", "net.model.3"),
        (320, 320), pretrained_source="asset yolov5n_coco",
        # Not tuned: aligned pooling, and the letterbox grey as fill.
        config_overrides=(("pooling", "same"), ("fill_value", 114 / 255)),
        datasets=_coco_letterboxed((640, 640)), make_task=_coco_task, prepare=_letterbox_to_input,
        profile_record=YOLOV5N_COCO_PROFILE,
    ),
    # Spec section 3 (the paper's detectors).
    _detector_preset("ssd300_vgg16", (320, 320), ("backbone.extra.0.3", "backbone.extra.0.1"),
                     ("backbone.extra.0.3", "backbone.extra.0.5"), "SSD300-VGG16 (torchvision)"),
    _detector_preset("retinanet_resnet50_fpn", (512, 640), _RESNET_FPN_S, _RESNET_FPN_D, "RetinaNet ResNet-50 FPN (torchvision)"),
    _detector_preset("fasterrcnn_resnet50_fpn", (512, 640), _RESNET_FPN_S, _RESNET_FPN_D, "Faster R-CNN ResNet-50 FPN (torchvision)"),
    # Chosen by analogy (early 1/2-1/4 resolution blocks; one deep block).
    _detector_preset("ssdlite320_mobilenet_v3_large", (320, 320), ("backbone.features.0.0", "backbone.features.0.1", "backbone.features.0.2"),
                     ("backbone.features.0.0", "backbone.features.1", "backbone.features.0.2"), "SSDlite320 MobileNetV3-Large (torchvision)"),
    _segmenter_preset("fcn_resnet50", ("backbone.relu", "backbone.conv1", "backbone.layer1.0.conv1"),
                      ("backbone.conv1", "backbone.layer4", "backbone.layer1.0.conv1"), "FCN ResNet-50 (torchvision)"),
    _segmenter_preset("deeplabv3_resnet50", ("backbone.relu", "backbone.conv1", "backbone.layer1.0.conv1"),
                      ("backbone.conv1", "backbone.layer4", "backbone.layer1.0.conv1"), "DeepLabV3 ResNet-50 (torchvision)"),
    _segmenter_preset("lraspp_mobilenet_v3_large", ("backbone.0", "backbone.1", "backbone.2"),
                      ("backbone.0", "backbone.16", "backbone.2"), "LR-ASPP MobileNetV3-Large (torchvision)"),
):
    register_preset(_preset)
