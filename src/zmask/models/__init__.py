"""Models: the project's ESPNet and YOLOv5n definitions, torchvision wrappers, and presets."""

from .espnet import ESPNet, ESPNetSegmenter, espnet
from .presets import PRESETS, ModelPreset, get_preset
from .torchvision_models import TorchvisionDetector, TorchvisionSegmenter, build_detector, build_segmenter
from .yolov5 import YOLOv5, YOLOv5Detector, letterbox, non_max_suppression, scale_boxes, yolov5n

__all__ = [
    "ESPNet", "ESPNetSegmenter", "ModelPreset", "PRESETS", "TorchvisionDetector", "TorchvisionSegmenter", "YOLOv5",
    "YOLOv5Detector", "build_detector", "build_segmenter", "espnet", "get_preset", "letterbox", "non_max_suppression",
    "scale_boxes", "yolov5n",
]
