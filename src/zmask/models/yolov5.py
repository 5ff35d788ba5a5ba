"""YOLOv5n (v6.1), written from the architecture description, with letterboxing, decoding, NMS and
mapping back to image coordinates and COCO category ids.

:class:`YOLOv5Detector` takes B x 3 x H x W RGB batches in [0, 1] (H, W multiples of 32) and
returns torchvision's detection format: one dict per image with ``boxes`` (xyxy, input pixels),
``labels`` (COCO category ids) and ``scores``. :meth:`YOLOv5Detector.detect` takes images of any
size, letterboxes them, and maps boxes back to each original image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..assets import asset_path
from ..data.letterbox import Letterbox, letterbox, scale_boxes  # noqa: F401 - re-exported here for earlier imports
from ..errors import AssetError, ZMaskError
from .espnet import load_state_dict_file

# YOLO class index (0..79) -> COCO category id.
COCO80_TO_91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
STRIDES = (8, 16, 32)
_MAX_WH = 7680  # class offset of the class-aware NMS


class Conv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, momentum 0.03) -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, 1)
        self.cv2 = Conv(c2, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        hidden = c2 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.cv1(x)
        b = self.m(a)
        c = self.m(b)
        return self.cv2(torch.cat([a, b, c, self.m(c)], 1))


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


class Detect(nn.Module):
    """Detection head: per level a 1x1 conv to 3 x 85 values, sigmoid, grid/anchor decoding."""

    anchors: torch.Tensor

    def __init__(self, nc: int, anchors: list[list[int]], channels: list[int]) -> None:
        super().__init__()
        self.nc, self.no, self.na = nc, nc + 5, len(anchors[0]) // 2
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        pixel_anchors = torch.tensor(anchors, dtype=torch.float32).view(len(anchors), -1, 2)
        # Stored in grid units (pixels / stride), as in the published state dict.
        self.register_buffer("anchors", pixel_anchors / torch.tensor(STRIDES, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        decoded, raw = [], []
        for level, (conv, feature) in enumerate(zip(self.m, features)):
            out = conv(feature)
            batch, _, ny, nx = out.shape
            out = out.view(batch, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(out)
            stride = STRIDES[level]
            gy, gx = torch.meshgrid(torch.arange(ny, device=out.device), torch.arange(nx, device=out.device), indexing="ij")
            grid = (torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2).float() - 0.5).to(out.dtype)
            anchor_grid = (self.anchors[level] * stride).view(1, self.na, 1, 1, 2).to(out.dtype)
            y = out.sigmoid()
            xy = (y[..., 0:2] * 2 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * anchor_grid
            decoded.append(torch.cat([xy, wh, y[..., 4:]], -1).view(batch, -1, self.no))
        return torch.cat(decoded, 1), raw


class YOLOv5(nn.Module):
    """The network: ``model`` holds the 25 layers of the config (keys ``model.0`` ... ``model.24``).

    ``forward`` returns ``(decoded, raw)``: decoded B x N x 85 (cx, cy, w, h in input pixels,
    objectness, 80 class probabilities) and the three pre-sigmoid head maps.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        layers, self.sources, self.saved = _build(config)
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ZMaskError(f"YOLOv5 needs input height and width that are multiples of 32, got {tuple(x.shape[-2:])}; letterbox first")
        outputs: list[torch.Tensor | None] = []
        value: Any = x  # a layer's input and output: a tensor, a list of them (Concat, Detect), Detect's tuple
        for index, (layer, source) in enumerate(zip(self.model, self.sources)):
            if source != -1:
                value = outputs[source] if isinstance(source, int) else [value if j == -1 else outputs[j] for j in source]
            value = layer(value)
            outputs.append(value if index in self.saved else None)
        return value


def _build(config: dict[str, Any]) -> tuple[list[nn.Module], list[Any], set[int]]:
    depth, width, nc = config["depth_multiple"], config["width_multiple"], config["nc"]
    channels = [config.get("ch", 3)]
    layers: list[nn.Module] = []
    sources: list[Any] = []
    saved: set[int] = set()
    for index, (source, number, kind, args) in enumerate(config["backbone"] + config["head"]):
        number = max(round(number * depth), 1) if number > 1 else number
        inputs = [channels[-1] if s == -1 else channels[s + 1] for s in ([source] if isinstance(source, int) else source)]
        layer: nn.Module
        if kind in ("Conv", "C3", "SPPF"):
            c2 = math.ceil(args[0] * width / 8) * 8
            if kind == "Conv":
                layer = Conv(inputs[0], c2, *args[1:])
            elif kind == "C3":
                layer = C3(inputs[0], c2, number, *args[1:])
            else:
                layer = SPPF(inputs[0], c2, *args[1:])
        elif kind == "nn.Upsample":
            layer, c2 = nn.Upsample(scale_factor=args[1], mode=args[2]), inputs[0]
        elif kind == "Concat":
            layer, c2 = Concat(), sum(inputs)
        elif kind == "Detect":
            layer, c2 = Detect(nc, config["anchors"], inputs), 0
        else:
            raise ZMaskError(f"unsupported YOLOv5 module {kind!r} in the configuration")
        layers.append(layer)
        sources.append(source)
        saved.update(s % (index + 1) for s in ([source] if isinstance(source, int) else source) if s != -1)
        channels.append(c2)
    return layers, sources, saved


def non_max_suppression(
    decoded: torch.Tensor, conf_threshold: float = 0.25, iou_threshold: float = 0.45, max_det: int = 1000, multi_label: bool = False
) -> list[torch.Tensor]:
    """Upstream's NMS: per image an n x 6 tensor (x1, y1, x2, y2, score, class), highest score first."""
    results = []
    for rows in decoded:
        rows = rows[rows[:, 4] > conf_threshold]
        if rows.shape[0] == 0:
            results.append(rows.new_zeros(0, 6))
            continue
        class_conf = rows[:, 5:] * rows[:, 4:5]
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        if multi_label and class_conf.shape[1] > 1:
            index, cls = (class_conf > conf_threshold).nonzero(as_tuple=True)
            detections = torch.cat([boxes[index], class_conf[index, cls, None], cls[:, None].float()], 1)
        else:
            score, cls = class_conf.max(1, keepdim=True)
            detections = torch.cat([boxes, score, cls.float()], 1)[score.view(-1) > conf_threshold]
        if detections.shape[0] > 30000:
            detections = detections[detections[:, 4].argsort(descending=True)[:30000]]
        keep = torchvision.ops.nms(detections[:, :4] + detections[:, 5:6] * _MAX_WH, detections[:, 4], iou_threshold)
        results.append(detections[keep[:max_det]])
    return results


class YOLOv5Detector(nn.Module):
    """YOLOv5 in torchvision's detection interface (see module docstring).

    Layer names for Z-Mask are those of ``self.net`` prefixed with ``net.``, e.g. ``net.model.2``.
    """

    coco_ids: torch.Tensor
    objectives: tuple[str, ...] = ("untargeted", "vanishing")

    def __init__(self, net: YOLOv5, names: list[str], conf_threshold: float = 0.25, iou_threshold: float = 0.45,
                 max_det: int = 1000, multi_label: bool = False) -> None:
        super().__init__()
        self.net = net
        self.names = names
        self.conf_threshold, self.iou_threshold, self.max_det, self.multi_label = conf_threshold, iou_threshold, max_det, multi_label
        self.register_buffer("coco_ids", torch.tensor(COCO80_TO_91), persistent=False)

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(decoded B x N x 85, raw head maps) for a batch in [0, 1]."""
        return self.net(images)

    def postprocess(self, decoded: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        detections = non_max_suppression(decoded, self.conf_threshold, self.iou_threshold, self.max_det, self.multi_label)
        return [{"boxes": d[:, :4], "scores": d[:, 4], "labels": self.coco_ids[d[:, 5].long()]} for d in detections]

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.postprocess(self.net(images)[0])

    def objective(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], kind: str = "untargeted") -> torch.Tensor:
        """Differentiable attack objective (to maximise) on predictions matched to ground truth.

        Predictions are matched to a ground-truth box (xyxy in input pixels, COCO ``labels``) when
        their IoU exceeds 0.5 (0.3 for ``vanishing``). ``untargeted`` (class-untargeted): the mean
        margin log(max other class probability) - log(true class probability), which keeps the
        objects detected but under wrong classes (confident false positives, missed true ones: what
        lowers COCO AP); ``vanishing``: mean log(1 - objectness), which suppresses the detections.
        """
        if kind not in ("untargeted", "vanishing"):
            raise ZMaskError(f"unknown detection objective {kind!r}; use 'untargeted' or 'vanishing'")
        decoded = self.net(images)[0]
        lookup = {coco: index for index, coco in enumerate(COCO80_TO_91)}
        terms = []
        for rows, target in zip(decoded, targets):
            if target["boxes"].numel() == 0:
                continue
            unknown = [int(l) for l in target["labels"] if int(l) not in lookup]
            if unknown:
                raise ZMaskError(f"target labels {unknown} are not COCO category ids")
            cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            overlap, match = torchvision.ops.box_iou(boxes, target["boxes"].to(boxes)).max(1)
            selected = overlap > (0.3 if kind == "vanishing" else 0.5)
            if not selected.any():
                continue
            objectness = rows[selected, 4]
            if kind == "vanishing":
                terms.append(torch.log1p(-objectness.clamp(max=1 - 1e-6)))
            else:
                classes = torch.tensor([lookup[int(l)] for l in target["labels"]], device=rows.device)[match[selected]]
                class_probability = rows[selected, 5:]
                true = class_probability.gather(1, classes[:, None]).squeeze(1)
                other = class_probability.scatter(1, classes[:, None], 0.0).amax(1)
                terms.append(torch.log(other.clamp(min=1e-9)) - torch.log(true.clamp(min=1e-9)))
        if not terms:
            return decoded.sum() * 0.0
        return torch.cat(terms).mean()

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor], size: int = 640, auto: bool = True) -> list[dict[str, torch.Tensor]]:
        """Detect on images of any size: letterbox each, run, and map boxes back to it."""
        results = []
        for image in images:
            boxed, geometry = letterbox(image, size, auto=auto)
            output = self(boxed[None].to(next(self.parameters()).device))[0]
            output["boxes"] = scale_boxes(output["boxes"], geometry)
            results.append(output)
        return results


def load_yolov5_config(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
        return data
    except (OSError, json.JSONDecodeError) as error:
        raise AssetError(f"cannot read YOLOv5 configuration {path}: {error}") from None


def yolov5n(pretrained: bool = True, weights_path=None, config_path=None, **detector_options: Any) -> YOLOv5Detector:
    """YOLOv5n v6.1 on COCO (the published weights, converted to safetensors)."""
    description = load_yolov5_config(config_path or asset_path("yolov5n_coco_config"))
    net = YOLOv5(description["config"])
    if pretrained or weights_path is not None:
        path = weights_path if weights_path is not None else asset_path("yolov5n_coco")
        net.load_state_dict(load_state_dict_file(path, "YOLOv5n"), strict=True)
    return YOLOv5Detector(net.eval(), list(description["names"]), **detector_options).eval()
