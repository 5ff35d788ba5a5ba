"""Model presets: how to build each supported model and which layers Z-Mask reads in it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import ZMaskConfig
from .espnet import ESPNET_VARIANTS, espnet
from .torchvision_models import build_detector, build_segmenter
from .yolov5 import yolov5n

MASK_DILATION = 8


@dataclass(frozen=True)
class ModelPreset:
    """A known model: its task, builder, input size and candidate shallow/deep layers.

    ``build(pretrained)`` returns the model in its wrapper (RGB in [0, 1] in). Layer names are
    relative to that wrapper, ready for :class:`zmask.ZMaskConfig`.
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

    def config(self, **overrides) -> ZMaskConfig:
        """The paper's setting scaled to this model's input and heatmap size, with the preset's own
        choices (``config_overrides``) and then the caller's ``overrides`` applied."""
        builder = ZMaskConfig.for_segmentation if self.task == "segmentation" else ZMaskConfig.for_detection
        base = builder(self.shallow_layers, self.deep_layers, self.input_size, heatmap_size=self.heatmap_size)
        return base.replace(**{**dict(self.config_overrides), **overrides})


def _espnet_preset(dataset: str) -> ModelPreset:
    variant = ESPNET_VARIANTS[dataset]
    height, width = variant.input_size
    return ModelPreset(
        f"espnet_{dataset}", "segmentation", f"ESPNet p=2 q=8 trained on {dataset} (project definition, upstream weights)",
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
    )


def _detector_preset(name: str, input_size, shallow, deep, description) -> ModelPreset:
    return ModelPreset(
        name, "detection", description, lambda pretrained: build_detector(name, pretrained), input_size,
        tuple(f"model.{layer}" for layer in shallow), tuple(f"model.{layer}" for layer in deep),
        (input_size[0] // 2, input_size[1] // 2), pretrained_source="torchvision weights enum (downloads)",
    )


def _segmenter_preset(name: str, shallow, deep, description) -> ModelPreset:
    return ModelPreset(
        name, "segmentation", description, lambda pretrained: build_segmenter(name, pretrained), (512, 1024),
        tuple(f"model.{layer}" for layer in shallow), tuple(f"model.{layer}" for layer in deep), (128, 256), 21, 255,
        pretrained_source="torchvision weights enum (downloads)",
    )


_RESNET_FPN_S = ("backbone.body.relu", "backbone.body.conv1", "backbone.body.layer1.0.conv1")
_RESNET_FPN_D = ("backbone.body.conv1", "backbone.body.layer4", "backbone.body.layer1.0.conv1")

PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        _espnet_preset("camvid"),
        _espnet_preset("cityscapes"),
        ModelPreset(
            "yolov5n_coco", "detection", "YOLOv5n v6.1 on COCO (project definition, upstream weights)",
            # COCO evaluation thresholds (the reference mAP protocol); draw with score > 0.25.
            lambda pretrained: yolov5n(pretrained=pretrained, conf_threshold=0.001, iou_threshold=0.6, max_det=300), (640, 640),
            # Per-layer separability on coco_tiny train: only the 1/4-resolution blocks separate
            # patched from clean images (model.1 AUC 1.00, model.2 0.97); deep layers do not (< 0.6).
            ("net.model.1", "net.model.2"), ("net.model.1", "net.model.2", "net.model.3"),
            (320, 320), pretrained_source="asset yolov5n_coco",
            # Not tuned: aligned pooling, and the letterbox grey as fill.
            config_overrides=(("pooling", "same"), ("fill_value", 114 / 255)),
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
    )
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        from ..errors import ZMaskError

        raise ZMaskError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
