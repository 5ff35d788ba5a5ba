"""Letterboxing: resize keeping the aspect ratio and pad to a detector's input size (YOLOv5's rules),
and the inverse map of boxes back to the original image. Data preparation, used by the COCO
datasets, the detection task and the detector presets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Letterbox:
    """How an image was letterboxed: scale ``gain`` and float half-paddings (``pad_w``, ``pad_h``)."""

    gain: float
    pad_w: float
    pad_h: float
    original_size: tuple[int, int]


def letterbox(
    image: torch.Tensor, new_shape: int | tuple[int, int] = 640, auto: bool = True, scaleup: bool = True, stride: int = 32
) -> tuple[torch.Tensor, Letterbox]:
    """Resize keeping the aspect ratio and pad with gray 114 (upstream's rules; RGB in [0, 1]).

    The bilinear resize (no antialiasing) matches OpenCV's INTER_LINEAR; the result is quantised to
    8-bit levels as an OpenCV uint8 image would be.
    """
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    height, width = image.shape[-2:]
    ratio = min(new_shape[0] / height, new_shape[1] / width)
    if not scaleup:
        ratio = min(ratio, 1.0)
    new_w, new_h = round(width * ratio), round(height * ratio)
    pad_w, pad_h = new_shape[1] - new_w, new_shape[0] - new_h
    if auto:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    half_w, half_h = pad_w / 2, pad_h / 2
    if (width, height) != (new_w, new_h):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        image = (image * 255).round().clamp(0, 255) / 255
    top, bottom = round(half_h - 0.1), round(half_h + 0.1)
    left, right = round(half_w - 0.1), round(half_w + 0.1)
    image = F.pad(image, (left, right, top, bottom), value=114 / 255)
    return image, Letterbox(ratio, half_w, half_h, (height, width))


def scale_boxes(boxes: torch.Tensor, geometry: Letterbox) -> torch.Tensor:
    """Letterboxed-input xyxy boxes -> original image pixels (clipped)."""
    boxes = boxes.clone()
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - geometry.pad_w) / geometry.gain).clamp(0, geometry.original_size[1])
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - geometry.pad_h) / geometry.gain).clamp(0, geometry.original_size[0])
    return boxes
