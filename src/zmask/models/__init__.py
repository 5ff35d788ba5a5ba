"""Models: the project's ESPNet and YOLOv5n definitions, torchvision wrappers, presets with their shipped
profiles, and presets made on the fly from your own factory (``module:callable``)."""

from .espnet import ESPNet, ESPNetSegmenter, espnet
from .presets import PRESETS, ModelPreset, get_preset
from .profiles import ProfileRecord
from .torchvision_models import TorchvisionDetector, TorchvisionSegmenter, build_detector, build_segmenter
from .user import FOLDER_LAYOUTS, FolderLayout, build_from_factory, is_factory_spec, load_factory, preset_from_factory
from .yolov5 import YOLOv5, YOLOv5Detector, letterbox, non_max_suppression, scale_boxes, yolov5n
from .espnetv2 import ESPNetv2, espnetv2  # registers the espnetv2_camvid preset
from .dicenet import DiCENet, dicenet  # registers the dicenet_camvid preset
from .cgnet import CGNet, CGNetSegmenter, cgnet  # registers the cgnet_camvid preset
from .edgenets import EdgeNetsSegmenter
from .nanodet import NanoDet, NanoDetDetector, nanodet_m, nanodet_warp  # registers the nanodet_m_coco preset
from .fastestdet import FastestDet, FastestDetDetector, fastestdet, stretch_resize  # registers the fastestdet_coco preset

__all__ = [
    "ESPNet", "ESPNetSegmenter", "FOLDER_LAYOUTS", "FolderLayout", "ModelPreset", "PRESETS", "ProfileRecord", "TorchvisionDetector",
    "TorchvisionSegmenter", "YOLOv5",
    "YOLOv5Detector", "build_detector", "build_from_factory", "build_segmenter", "espnet", "get_preset", "is_factory_spec",
    "letterbox", "load_factory", "non_max_suppression", "preset_from_factory", "scale_boxes", "yolov5n",
]
__all__ += ["FastestDet", "FastestDetDetector", "NanoDet", "NanoDetDetector", "fastestdet", "nanodet_m", "nanodet_warp", "stretch_resize"]
__all__ += ["CGNet", "CGNetSegmenter", "DiCENet", "ESPNetv2", "EdgeNetsSegmenter", "cgnet", "dicenet", "espnetv2"]
