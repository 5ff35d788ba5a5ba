"""torchvision detectors and segmenters behind the interface Z-Mask and the attacks expect.

Both wrappers take B x 3 x H x W RGB batches in [0, 1]. Detectors return torchvision's list of
dicts (``boxes`` xyxy in input pixels, ``labels`` COCO category ids, ``scores``); segmenters return
logits. Detector transforms are pinned so that internal activations cover exactly the input:
R-CNN and RetinaNet run at the input's own size (H and W multiples of 32, no resize, no padding),
SSD warps the whole input to its fixed size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ZMaskError


class TorchvisionDetector(nn.Module):
    """A torchvision detection model with a tensor-batch interface and an attack objective."""

    objectives: tuple[str, ...] = ("untargeted",)

    def __init__(self, model: nn.Module, fixed_size: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fixed_size = fixed_size

    def _pin_transform(self, height: int, width: int) -> None:
        transform: Any = self.model.transform  # torchvision's GeneralizedRCNNTransform (torchvision has no type stubs)
        if self.fixed_size:
            return
        if height % 32 or width % 32:
            raise ZMaskError(f"{type(self.model).__name__} input must have height and width that are multiples of 32, got {height}x{width}")
        transform.min_size, transform.max_size = (min(height, width),), max(height, width)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self._pin_transform(*images.shape[-2:])
        return self.model(list(images))

    def objective(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], kind: str = "untargeted") -> torch.Tensor:
        """The detector's own training losses on the ground truth (summed): an attack maximises it."""
        if kind != "untargeted":
            raise ZMaskError(f"objective {kind!r} is not available for torchvision detectors; use 'untargeted'")
        self._pin_transform(*images.shape[-2:])
        was_training = self.model.training
        self.model.train()  # torchvision detectors return losses only in training mode (their BNs are frozen)
        try:
            losses = self.model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        finally:
            self.model.train(was_training)
        return sum(losses.values())


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionSegmenter(nn.Module):
    """A segmentation model behind the [0, 1] RGB interface: ``(x - mean) / std`` inside (the
    normalisation the model was trained with; ImageNet's by default), returns the logits (the
    ``out`` entry of torchvision's dict output, or the model's tensor output as it is)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32).flatten(), torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() not in (1, 3) or std_t.numel() not in (1, 3):
            raise ConfigError(f"mean and std must have 1 or 3 values (one per RGB channel), got {list(mean)} and {list(std)}")
        if not torch.isfinite(mean_t).all() or not torch.isfinite(std_t).all() or (std_t <= 0).any():
            raise ConfigError(f"std must be positive and mean and std finite, got mean {list(mean)}, std {list(std)}")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.model((images - self.mean) / self.std)
        return output["out"] if isinstance(output, Mapping) else output


def _weights(enum: Any, pretrained: bool) -> Any:
    return enum.DEFAULT if pretrained else None


def _with_classes(builder: Any, name: str, weights: Any, num_classes: int | None, **options: Any) -> nn.Module:
    """``builder(weights=..., num_classes=...)``; a class count that the weights do not have is a ``ConfigError``."""
    if num_classes is not None:
        if num_classes < 1:
            raise ConfigError(f"{name}: num_classes must be at least 1, got {num_classes}")
        if weights is not None and len(weights.meta["categories"]) != num_classes:
            raise ConfigError(f"{name}: the pretrained weights predict {len(weights.meta['categories'])} classes, not {num_classes}; "
                              "build it with pretrained=False to train a head with another class count")
        options["num_classes"] = num_classes
    return builder(weights=weights, weights_backbone=None, **options)


def build_detector(name: str, pretrained: bool = False, num_classes: int | None = None) -> TorchvisionDetector:
    """One of torchvision's COCO detectors; ``pretrained`` downloads torchvision's weights;
    ``num_classes`` (background included, as torchvision counts) for an untrained head of another size."""
    from torchvision.models import detection as d

    builders = {
        "ssd300_vgg16": (d.ssd300_vgg16, d.SSD300_VGG16_Weights, True),
        "ssdlite320_mobilenet_v3_large": (d.ssdlite320_mobilenet_v3_large, d.SSDLite320_MobileNet_V3_Large_Weights, True),
        "retinanet_resnet50_fpn": (d.retinanet_resnet50_fpn, d.RetinaNet_ResNet50_FPN_Weights, False),
        "fasterrcnn_resnet50_fpn": (d.fasterrcnn_resnet50_fpn, d.FasterRCNN_ResNet50_FPN_Weights, False),
    }
    if name not in builders:
        raise ZMaskError(f"unknown torchvision detector {name!r}; choose one of {sorted(builders)}")
    builder, weights, fixed = builders[name]
    model = _with_classes(builder, name, _weights(weights, pretrained), num_classes)
    return TorchvisionDetector(model.eval(), fixed_size=fixed).eval()


def build_segmenter(name: str, pretrained: bool = False, num_classes: int | None = None,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> TorchvisionSegmenter:
    """One of torchvision's segmentation models; ``pretrained`` downloads weights (21 VOC classes);
    ``num_classes`` for an untrained model with another class count (e.g. 11 for CamVid);
    ``mean``/``std``: the normalisation the wrapper applies (see :class:`TorchvisionSegmenter`)."""
    from torchvision.models import segmentation as s

    builders = {
        "fcn_resnet50": (s.fcn_resnet50, s.FCN_ResNet50_Weights),
        "deeplabv3_resnet50": (s.deeplabv3_resnet50, s.DeepLabV3_ResNet50_Weights),
        "lraspp_mobilenet_v3_large": (s.lraspp_mobilenet_v3_large, s.LRASPP_MobileNet_V3_Large_Weights),
    }
    if name not in builders:
        raise ZMaskError(f"unknown torchvision segmenter {name!r}; choose one of {sorted(builders)}")
    builder, weights = builders[name]
    options = {"aux_loss": False} if name != "lraspp_mobilenet_v3_large" and not pretrained else {}
    model = _with_classes(builder, name, _weights(weights, pretrained), num_classes, **options)
    return TorchvisionSegmenter(model.eval(), mean, std).eval()
