"""Datasets (``torch.utils.data``): images as RGB float tensors in [0, 1] (3 x H x W)."""

from .batching import image_batches
from .camvid import CamVid
from .cityscapes import Cityscapes
from .coco import CocoDetection, LetterboxedDetection, collate_detection
from .folder import ImageFolder, ResizedSegmentation
from .io import read_image, read_label

__all__ = ["CamVid", "Cityscapes", "CocoDetection", "ImageFolder", "LetterboxedDetection", "ResizedSegmentation", "collate_detection", "image_batches", "read_image", "read_label"]
