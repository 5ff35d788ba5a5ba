"""NanoDet-m 320 (ShuffleNetV2 1.0x + PAN + GFL head, RangiLyu/nanodet v0.x), written from the
architecture description (ARCHITECTURES_more.md part H), with the upstream preprocessing (BGR,
mean/std, a centred keep-ratio warp with a black border), decoding, NMS and the mapping back to
image coordinates and COCO category ids.

:class:`NanoDetDetector` takes B x 3 x H x W RGB batches in [0, 1] (H, W multiples of 32; the
preset uses 320 x 320) and returns torchvision's detection format: one dict per image with
``boxes`` (xyxy, input pixels), ``labels`` (COCO category ids) and ``scores``.
:func:`nanodet_warp` maps an image of any size to the input as upstream does, and returns the
geometry (:class:`~zmask.models.yolov5.Letterbox`) that maps boxes back.

Unlike upstream, the PAN adds out of place, so forward hooks on any module read final values.
Layer names for Z-Mask are those of ``self.net`` prefixed with ``net.``, e.g. ``net.backbone.stage2``.

:func:`dense_objective` (the attack objectives on dense per-location predictions) is shared
with :mod:`zmask.models.fastestdet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import Dataset

from ..assets import asset_path
from ..errors import AssetError, InputError, ZMaskError
from ..tasks import DetectionTask
from .espnet import load_state_dict_file
from .presets import ModelPreset, _coco_paths, _coco_task, register_preset
from .profiles import ProfileRecord
from .yolov5 import COCO80_TO_91, Letterbox

NUM_CLASSES = 80
REG_MAX = 7
STRIDES = (8, 16, 32)
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
INPUT_SIZE = (320, 320)

# COCO class names in contiguous order (index k -> COCO category id COCO80_TO_91[k]).
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1)


def _dw(channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def _pw(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle: output channel ``j * groups + i`` is input channel ``i * (C / groups) + j``."""
    batch, channels, height, width = x.shape
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 block, torchvision layout: split in halves (stride 1) or two branches (stride 2),
    concatenate, shuffle with 2 groups after every block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ZMaskError(f"ShuffleNetV2 blocks have stride 1 or 2, not {stride}")
        half = cout // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(_dw(cin, 2), nn.BatchNorm2d(cin), _pw(cin, half), nn.BatchNorm2d(half), _act())
        else:
            self.branch1 = nn.Sequential()
        first = cin if stride == 2 else half
        self.branch2 = nn.Sequential(
            _pw(first, half), nn.BatchNorm2d(half), _act(),
            _dw(half, stride), nn.BatchNorm2d(half), _pw(half, half), nn.BatchNorm2d(half), _act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            passed, processed = x.chunk(2, dim=1)
            out = torch.cat([passed, self.branch2(processed)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1.0x (LeakyReLU 0.1, no conv5): returns C3, C4, C5 (strides 8, 16, 32)."""

    def __init__(self, widths: tuple[int, int, int] = (116, 232, 464), repeats: tuple[int, int, int] = (4, 8, 4)) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), _act())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cins = (24, *widths[:2])
        self.stage2, self.stage3, self.stage4 = (
            nn.Sequential(ShuffleUnit(cin, width, 2), *(ShuffleUnit(width, width, 1) for _ in range(repeat - 1)))
            for cin, width, repeat in zip(cins, widths, repeats)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.conv1(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return c3, c4, self.stage4(c4)


class _Lateral(nn.Module):
    """A 1x1 lateral conv with bias (key ``conv``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _resize_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class PAN(nn.Module):
    """PAN without output convs: 1x1 laterals, bilinear top-down then bottom-up additions (out of place)."""

    def __init__(self, in_channels: tuple[int, ...] = (116, 232, 464), out_channels: int = 96) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(_Lateral(c, out_channels) for c in in_channels)

    def forward(self, features: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = (conv(feature) for conv, feature in zip(self.lateral_convs, features))
        p4 = p4 + _resize_to(p5, p4)
        p3 = p3 + _resize_to(p4, p3)
        p4 = p4 + _resize_to(p3, p4)
        p5 = p5 + _resize_to(p4, p5)
        return p3, p4, p5


class DWModule(nn.Module):
    """Depthwise 3x3 + BN + LeakyReLU, pointwise 1x1 + BN + LeakyReLU (one ``act`` module, used twice)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.dwnorm = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.pwnorm = nn.BatchNorm2d(channels)
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pwnorm(self.pointwise(self.act(self.dwnorm(self.depthwise(x))))))


class _Integral(nn.Module):
    """Holds the distribution bins [0, ..., reg_max] (buffer ``project``)."""

    project: torch.Tensor

    def __init__(self, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """... x 4 x (reg_max + 1) logits -> ... x 4 expected distances (in stride units)."""
        return logits.softmax(-1) @ self.project.to(logits.dtype)


class NanoDetHead(nn.Module):
    """GFL head with two depthwise-separable convs per level and one shared cls+box 1x1 output conv.

    ``gfl_reg`` exists in the published file (strict loading) but is not used, as upstream.
    """

    def __init__(self, channels: int = 96, num_classes: int = NUM_CLASSES, reg_max: int = REG_MAX, levels: int = 3) -> None:
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.cls_convs = nn.ModuleList(nn.Sequential(DWModule(channels), DWModule(channels)) for _ in range(levels))
        self.gfl_cls = nn.ModuleList(nn.Conv2d(channels, num_classes + 4 * (reg_max + 1), 1) for _ in range(levels))
        self.gfl_reg = nn.ModuleList(nn.Conv2d(channels, 4 * (reg_max + 1), 1) for _ in range(levels))
        self.distribution_project = _Integral(reg_max)

    def forward(self, features: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls_scores, bbox_preds = [], []
        for tower, output, feature in zip(self.cls_convs, self.gfl_cls, features):
            out = output(tower(feature))
            cls_scores.append(out[:, : self.num_classes])
            bbox_preds.append(out[:, self.num_classes:])
        return cls_scores, bbox_preds


class NanoDet(nn.Module):
    """The network (``backbone``, ``fpn``, ``head``) on normalised BGR input; returns
    ``(cls_scores, bbox_preds)``: per stride 8/16/32, B x 80 x H x W class logits and B x 32 x H x W
    distance-distribution logits (left, top, right, bottom x 8 bins)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ShuffleNetV2()
        self.fpn = PAN()
        self.head = NanoDetHead()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.head(self.fpn(self.backbone(x)))


def check_images(images: Any, model: str, multiple: int = 32) -> None:
    """Raise :class:`InputError` unless ``images`` is a float B x 3 x H x W tensor with H, W multiples of ``multiple``."""
    if not torch.is_tensor(images):
        raise InputError(f"{model} takes a tensor B x 3 x H x W, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"{model} takes B x 3 x H x W RGB images in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"{model} takes float images in [0, 1], got {images.dtype}")
    if images.shape[-2] % multiple or images.shape[-1] % multiple:
        raise InputError(f"{model} needs input height and width that are multiples of {multiple}, got "
                         f"{tuple(images.shape[-2:])}; map images with the preset's preparation first")


def _points(height: int, width: int, stride: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """H*W x 2 point centres (x, y) in input pixels, row-major: ``(col * s + (s - 1) / 2, row * s + (s - 1) / 2)``."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype),
                                indexing="ij")
    offset = (stride - 1) / 2
    return torch.stack([cols.reshape(-1) * stride + offset, rows.reshape(-1) * stride + offset], 1)


def dense_objective(boxes: torch.Tensor, class_probability: torch.Tensor, confidence: torch.Tensor,
                    targets: list[dict[str, torch.Tensor]], kind: str) -> torch.Tensor:
    """Differentiable attack objective (to maximise) on dense predictions matched to ground truth.

    ``boxes`` B x N x 4 (xyxy, input pixels), ``class_probability`` B x N x 80 (contiguous classes),
    ``confidence`` B x N (what a detection's existence rests on). Predictions are matched to a
    target box (COCO ``labels``) when their IoU exceeds 0.5 (0.3 for ``vanishing``), as for
    YOLOv5. ``untargeted``: mean log(max other class probability) - log(true class probability);
    ``vanishing``: mean log(1 - confidence).
    """
    if kind not in ("untargeted", "vanishing"):
        raise ZMaskError(f"unknown detection objective {kind!r}; use 'untargeted' or 'vanishing'")
    if len(targets) != boxes.shape[0]:
        raise InputError(f"{len(targets)} targets for a batch of {boxes.shape[0]} images")
    lookup = {coco: index for index, coco in enumerate(COCO80_TO_91)}
    terms = []
    for image_boxes, probability, image_confidence, target in zip(boxes, class_probability, confidence, targets):
        if target["boxes"].numel() == 0:
            continue
        unknown = [int(label) for label in target["labels"] if int(label) not in lookup]
        if unknown:
            raise ZMaskError(f"target labels {unknown} are not COCO category ids")
        overlap, match = torchvision.ops.box_iou(image_boxes, target["boxes"].to(image_boxes)).max(1)
        selected = overlap > (0.3 if kind == "vanishing" else 0.5)
        if not selected.any():
            continue
        if kind == "vanishing":
            terms.append(torch.log1p(-image_confidence[selected].clamp(max=1 - 1e-6)))
        else:
            classes = torch.tensor([lookup[int(label)] for label in target["labels"]], device=image_boxes.device)[match[selected]]
            chosen = probability[selected]
            true = chosen.gather(1, classes[:, None]).squeeze(1)
            other = chosen.scatter(1, classes[:, None], 0.0).amax(1)
            terms.append(torch.log(other.clamp(min=1e-9)) - torch.log(true.clamp(min=1e-9)))
    if not terms:
        return boxes.sum() * 0.0 + class_probability.sum() * 0.0
    return torch.cat(terms).mean()


class NanoDetDetector(nn.Module):
    """NanoDet-m in torchvision's detection interface (see the module docstring).

    Thresholds: ``score_threshold`` (strict), ``iou_threshold`` of the class-aware NMS,
    ``max_det`` per image, ``nms_pre`` (points kept per level before NMS). Upstream's COCO
    evaluation uses 0.05 / 0.6 / 100 / 1000; its demo draws boxes scoring above 0.35.
    """

    objectives: tuple[str, ...] = ("untargeted", "vanishing")
    mean: torch.Tensor
    std: torch.Tensor
    coco_ids: torch.Tensor

    def __init__(self, net: NanoDet, score_threshold: float = 0.35, iou_threshold: float = 0.6, max_det: int = 100,
                 nms_pre: int = 1000) -> None:
        super().__init__()
        if not 0 <= score_threshold < 1 or not 0 < iou_threshold <= 1 or max_det < 1 or nms_pre < 1:
            raise ZMaskError(f"NanoDet thresholds out of range: score {score_threshold}, IoU {iou_threshold}, "
                             f"max_det {max_det}, nms_pre {nms_pre}")
        self.net = net
        self.names = list(COCO_NAMES)
        self.score_threshold, self.iou_threshold, self.max_det, self.nms_pre = score_threshold, iou_threshold, max_det, nms_pre
        mean = torch.tensor(MEAN_BGR, dtype=torch.float32) / 255
        std = torch.tensor(STD_BGR, dtype=torch.float32) / 255
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("coco_ids", torch.tensor(COCO80_TO_91), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> upstream input: BGR, ``(x - mean / 255) / (std / 255)``."""
        check_images(images, "NanoDet")
        return (images.flip(1) - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def raw(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The head outputs (class logits, distance-distribution logits) per stride 8/16/32."""
        return self.net(self.normalise(images))

    def decode(self, cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor], input_size: tuple[int, int]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per level: boxes B x HW x 4 (xyxy, input pixels, clamped to the input), class scores
        B x HW x 80 (sigmoid), max-class scores B x HW (differentiable, all points)."""
        height, width = input_size
        boxes, scores, best = [], [], []
        for stride, cls, reg in zip(STRIDES, cls_scores, bbox_preds):
            batch, _, rows, cols = cls.shape
            score = cls.sigmoid().flatten(2).transpose(1, 2)
            distances = self.net.head.distribution_project(reg.reshape(batch, 4, REG_MAX + 1, rows * cols).permute(0, 3, 1, 2))
            distances = distances * stride
            points = _points(rows, cols, stride, cls.device, cls.dtype)[None]
            box = torch.cat([points - distances[..., :2], points + distances[..., 2:]], -1)
            limit = box.new_tensor([width, height, width, height])
            boxes.append(torch.minimum(box.clamp(min=0), limit))
            scores.append(score)
            best.append(score.amax(-1))
        return boxes, scores, best

    def postprocess(self, cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor], input_size: tuple[int, int]
                    ) -> list[dict[str, torch.Tensor]]:
        """Upstream ``get_bboxes``: top ``nms_pre`` points per level, (point, class) pairs scoring
        above the threshold, offset-based class-aware NMS, at most ``max_det`` by score."""
        boxes, scores, best = self.decode(cls_scores, bbox_preds, input_size)
        results = []
        for image in range(cls_scores[0].shape[0]):
            image_boxes, image_scores = [], []
            for level_boxes, level_scores, level_best in zip(boxes, scores, best):
                level_boxes, level_scores = level_boxes[image], level_scores[image]
                if level_scores.shape[0] > self.nms_pre:
                    keep = level_best[image].topk(self.nms_pre).indices
                    level_boxes, level_scores = level_boxes[keep], level_scores[keep]
                image_boxes.append(level_boxes)
                image_scores.append(level_scores)
            candidates, classes = torch.cat(image_boxes), torch.cat(image_scores)
            point, label = (classes > self.score_threshold).nonzero(as_tuple=True)
            box, score = candidates[point], classes[point, label]
            if box.shape[0] == 0:
                results.append({"boxes": box.reshape(0, 4), "scores": score, "labels": self.coco_ids[label]})
                continue
            offsets = label.to(box) * (box.max() + 1)
            keep = torchvision.ops.nms(box + offsets[:, None], score, self.iou_threshold)[: self.max_det]
            results.append({"boxes": box[keep], "scores": score[keep], "labels": self.coco_ids[label[keep]]})
        return results

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        cls_scores, bbox_preds = self.raw(images)
        return self.postprocess(cls_scores, bbox_preds, (images.shape[-2], images.shape[-1]))

    def objective(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], kind: str = "untargeted") -> torch.Tensor:
        """Attack objective (to maximise) on all points' predictions (see :func:`dense_objective`);
        ``vanishing`` lowers the best class score, GFL's only confidence."""
        boxes, scores, best = self.decode(*self.raw(images), (images.shape[-2], images.shape[-1]))
        return dense_objective(torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(best, 1), targets, kind)

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor], size: tuple[int, int] = INPUT_SIZE) -> list[dict[str, torch.Tensor]]:
        """Detect on RGB images (3 x H x W in [0, 1]) of any size: warp each as upstream, run, and
        map boxes back to it."""
        from .yolov5 import scale_boxes

        device = next(self.parameters()).device
        results = []
        for image in images:
            warped, geometry = nanodet_warp(image, size)
            output = self(warped[None].to(device))[0]
            output["boxes"] = scale_boxes(output["boxes"].cpu(), geometry).to(device)
            results.append(output)
        return results


def to_uint8_levels(image: torch.Tensor) -> torch.Tensor:
    """A 3 x H x W image in [0, 1] as int64 8-bit levels (what upstream's ``cv2.imread`` gives)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.int64)


def nanodet_warp(image: torch.Tensor, size: tuple[int, int] = INPUT_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """Upstream NanoDet preprocessing geometry, bit-exact: scale by ``r`` to fit ``size`` (H, W)
    keeping the aspect ratio, centre, black border; ``cv2.warpPerspective`` with bilinear
    interpolation, which samples at integer pixel positions mapped through the inverse warp,
    rounded to 1/32 pixel, with integer weights, on the 8-bit image.

    Returns the warped 3 x H x W image in [0, 1] and a :class:`Letterbox` (``gain`` = r, paddings
    = the translation) with which ``scale_boxes`` maps boxes back to the original image.
    """
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 or min(image.shape[-2:]) < 1:
        raise InputError(f"nanodet_warp takes one RGB image 3 x H x W, got {getattr(image, 'shape', type(image).__name__)}")
    height, width = (int(v) for v in image.shape[-2:])
    out_h, out_w = (int(v) for v in size)
    ratio = out_h / height if width / height < out_w / out_h else out_w / width
    pad_w, pad_h = out_w / 2 - ratio * width / 2, out_h / 2 - ratio * height / 2
    row_index, row_weight = _warp_taps((torch.arange(out_h, dtype=torch.float64) - pad_h) / ratio, height)
    col_index, col_weight = _warp_taps((torch.arange(out_w, dtype=torch.float64) - pad_w) / ratio, width)
    levels = F.pad(to_uint8_levels(image), (1, 1, 1, 1))  # the black border, one pixel wide, is all the taps reach
    rows = levels[:, :, col_index[:, 0]] * col_weight[:, 0] + levels[:, :, col_index[:, 1]] * col_weight[:, 1]
    total = rows[:, row_index[:, 0]] * row_weight[:, 0, None] + rows[:, row_index[:, 1]] * row_weight[:, 1, None]
    warped = (total + 512) >> 10  # (sum of level x weight x 32 + 2^14) >> 15, as OpenCV's remap
    return warped.float() / 255, Letterbox(ratio, pad_w, pad_h, (height, width))


def _warp_taps(coords: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps at ``coords`` rounded to 1/32 pixel: per output, two indices into the axis
    padded by one zero on each side (taps outside the image land on a zero) and integer weights
    summing to 32."""
    fixed = torch.round(coords * 32).to(torch.int64)  # half to even, as OpenCV's saturate_cast
    low, fraction = torch.div(fixed, 32, rounding_mode="floor"), fixed % 32
    index = torch.stack([low + 1, low + 2], 1).clamp(0, length + 1)
    return index, torch.stack([32 - fraction, fraction], 1)


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model: str) -> None:
    """``load_state_dict(strict=True)``, its key/shape mismatch turned into an :class:`AssetError`."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise AssetError(f"{path} does not hold {model} weights (strict loading failed): {detail}") from None


def nanodet_m(pretrained: bool = True, weights_path: str | Path | None = None, **detector_options: Any) -> NanoDetDetector:
    """NanoDet-m 320 on COCO (the published weights, ``state_dict`` of the release checkpoint)."""
    net = NanoDet()
    if pretrained or weights_path is not None:
        path = weights_path if weights_path is not None else asset_path("nanodet_m_coco")
        checkpoint = load_state_dict_file(path, "NanoDet-m")
        state = checkpoint.get("state_dict", checkpoint)
        if not isinstance(state, dict):
            raise AssetError(f"{path} holds no NanoDet state dict")
        _load_strict(net, state, path, "NanoDet-m")
    return NanoDetDetector(net.eval(), **detector_options).eval()


class WarpedDetection(Dataset):
    """A detection dataset mapped to ``size`` (H, W) by :func:`nanodet_warp`, target boxes mapped
    into that frame; items add ``letterbox`` (the geometry that maps predictions back)."""

    def __init__(self, dataset: Dataset, size: tuple[int, int] = INPUT_SIZE) -> None:
        self.dataset, self.size = dataset, (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        image, geometry = nanodet_warp(item["image"], self.size)
        target = dict(item["target"])
        for key in ("boxes", "patch_boxes"):
            if key in target:
                boxes = target[key].reshape(-1, 4).clone()
                boxes[:, [0, 2]] = boxes[:, [0, 2]] * geometry.gain + geometry.pad_w
                boxes[:, [1, 3]] = boxes[:, [1, 3]] * geometry.gain + geometry.pad_h
                target[key] = boxes
        item.update(image=image, target=target, letterbox=geometry)
        return item


def _prepare(preset: ModelPreset, image: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Any image -> the preset's input, as upstream (keep-ratio warp, black border)."""
    return nanodet_warp(image, preset.input_size)[0], "warped (keep-ratio, centred, black border)"


def _coco_warped(split: str, limit: int | None, root: str | Path | None) -> Dataset:
    from ..data import CocoDetection

    images, annotations = _coco_paths(split, root)
    return WarpedDetection(CocoDetection(images, annotations, limit=limit), INPUT_SIZE)


NANODET_M_COCO_PROFILE = ProfileRecord(
    "nanodet_m_coco.safetensors",
    "18a40163fb1249c0facb42f88801e15962c17336e6b19b266bb9e8847cdaf23f",
    "coco_tiny train2017 (80 images, warped to 320x320 as upstream): clean statistics on 35 images, the fusion block on "
    "30 others and lambda0 on 15 more, each fusion/calibration image drawn 8 times, with the committed L patch "
    "(src/zmask/patches/nanodet_m_coco_L.png), 300 epochs; half of the clean samples carry a harmless occluder labelled "
    "'no patch'; lambda0 at <= 5% false alarms on the plain and on the occluded calibration negatives each; soft-mask "
    "threshold calibrated; layers chosen on the same training images (--layers auto); heatmap grid 40x40, the finest "
    "within 1.25x the forward (--max-overhead 0.25); seed 0",
    {
        "lambda0": 1.4351, "calibration_auc": 0.854, "calibration_mask_iou": 0.859, "val_map_clean": 0.262,
        "val_map_L_patch": 0.204, "val_map_L_patch_zmask": 0.216, "val_map_random_L": 0.213, "val_auc_L_patch": 1.000,
        "val_tpr_L_patch": 1.000, "val_clean_flag_rate": 0.000, "val_random_noise_flag_rate": 0.025,
        "val_mask_iou_L_patch": 0.895, "val_recovery_L_patch": 0.220,
    },
    "zmask fit --config experiments/nanodet_m_coco_fit.yaml",
    "docs/results/nanodet_m_coco/summary.md (zmask evaluate --config experiments/nanodet_m_coco.yaml); coco_tiny val2017 (80 images)",
)


NANODET_M_COCO = register_preset(ModelPreset(
    "nanodet_m_coco", DetectionTask.name, "NanoDet-m 320 on COCO (project definition, upstream weights)",
    # COCO evaluation thresholds (the reference mAP protocol); the drawing helpers show score > 0.25.
    lambda pretrained: nanodet_m(pretrained=pretrained, score_threshold=0.05, iou_threshold=0.6, max_det=100), INPUT_SIZE,
    # Chosen on coco_tiny train by per-layer evidence (zmask fit --layers auto over the part K
    # candidates and their neighbours, L patch): the 1/4 and 1/8 backbone blocks separate patched
    # from clean images (AUC 1.00 / 1.00 / 1.00) and localise the patch best; the PAN and head
    # layers do not separate at all (AUC < 0.7), so D stays in the backbone too.
    ("net.backbone.maxpool", "net.backbone.stage2.0", "net.backbone.stage2.1"),
    ("net.backbone.maxpool", "net.backbone.stage2.0", "net.backbone.stage2.1"),
    (INPUT_SIZE[0] // 2, INPUT_SIZE[1] // 2), pretrained_source="asset nanodet_m_coco",
    # Not tuned: aligned pooling, and the normalisation mean as fill (a zero network input).
    config_overrides=(("pooling", "same"), ("fill_value", tuple(v / 255 for v in reversed(MEAN_BGR)))),
    datasets=_coco_warped, make_task=_coco_task, prepare=_prepare, profile_record=NANODET_M_COCO_PROFILE,
))
