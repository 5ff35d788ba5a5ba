"""Building blocks shared by ESPNetv2 and DiCENet (sacmehta/EdgeNets), written from the
architecture description (``ARCHITECTURES_more.md`` parts E and F).

Attribute names reproduce the upstream state-dict keys. Two conv-BN-PReLU flavours exist and
differ only in their key names: the "named" ones (``conv``/``bn``/``act``) of the ESPNetv2
encoder and the "sequential" ones (``cbr.0/1/2``, ``br.0/1``) of the decoders and of DiCENet.
BatchNorm eps is PyTorch's default (1e-5) everywhere; every bilinear resize uses
``align_corners=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from .presets import ModelPreset
    from .profiles import ProfileRecord

#: The 20 outputs of the Cityscapes weights: trainIds 0..18, then 19 = Cityscapes ignore pixels.
EDGENETS_CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "background",
)


#: Scales of the efficient pyramid pooling, in the order of its stages.
EPP_SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)


def bilinear_ac(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (the EdgeNets convention)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def up2(x: torch.Tensor) -> torch.Tensor:
    """Double the spatial size, bilinear with ``align_corners=True``."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def check_multiple_of_16(x: torch.Tensor, model: str) -> None:
    """EdgeNets decoders add skips to up-sampled maps, which only line up for sides divisible by 16."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise InputError(f"{model} expects a B x 3 x H x W batch, got shape {tuple(x.shape)}")
    if x.shape[-2] % 16 or x.shape[-1] % 16:
        raise InputError(f"{model} needs input height and width that are multiples of 16, got {tuple(x.shape[-2:])}; "
                         "resize the image first (e.g. 360x480 CamVid to 368x480)")


class Shuffle(nn.Module):
    """Channel shuffle with ``groups`` groups (no parameters)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class CBRn(nn.Module):
    """Named conv (no bias, 'same' padding) -> BN -> PReLU: keys ``conv``, ``bn``, ``act``."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(n_out)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CBn(nn.Module):
    """Named conv -> BN (no activation): keys ``conv``, ``bn``."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BRn(nn.Module):
    """Named BN -> PReLU: keys ``bn``, ``act``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class CBRs(nn.Module):
    """Sequential conv -> BN -> PReLU: keys ``cbr.0``, ``cbr.1``, ``cbr.2``."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(n_out), nn.PReLU(n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


class BRs(nn.Module):
    """Sequential BN -> PReLU: keys ``br.0``, ``br.1``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


def bn_prelu(channels: int) -> nn.Sequential:
    """A bare ``Sequential(BN, PReLU)`` (the decoders' ``bu_br_*``)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))


class EfficientPyrPool(nn.Module):
    """EPP: project to ``proj`` channels, one depthwise 3x3 per scale (resizing around it), shuffle
    and merge the five scales, then a 1x1 to ``n_out`` (biased, with no BR, when ``last``)."""

    def __init__(self, n_in: int, proj: int, n_out: int, last: bool = False) -> None:
        super().__init__()
        self.last = last
        self.projection_layer = CBRs(n_in, proj, 1)
        self.stages = nn.ModuleList([nn.Conv2d(proj, proj, 3, 1, 1, groups=proj, bias=False) for _ in EPP_SCALES])
        scales = len(EPP_SCALES)
        self.merge_layer = nn.Sequential(
            BRs(scales * proj), Shuffle(scales), CBRs(scales * proj, proj, 3, groups=proj),
            nn.Conv2d(proj, n_out, 1, bias=last),
        )
        if not last:
            self.br = BRs(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection_layer(x)
        height, width = x.shape[-2:]
        outputs = []
        for scale, stage in zip(EPP_SCALES, self.stages):
            # ceil of the float product (e.g. 32 * 0.1 = 3.2000000000000006 -> 4), at least 5.
            size = (max(math.ceil(height * scale), 5), max(math.ceil(width * scale), 5))
            if scale > 1:
                t = F.adaptive_avg_pool2d(stage(bilinear_ac(x, size)), (height, width))
            elif scale == 1:
                t = stage(x)
            else:
                t = bilinear_ac(stage(F.adaptive_avg_pool2d(x, size)), (height, width))
            outputs.append(t)
        y = self.merge_layer(torch.cat(outputs, 1))
        return y if self.last else self.br(y)


class EfficientPWConv(nn.Module):
    """EPW: a grouped 3x3 conv-BN-PReLU gated per channel by a sigmoid of the input's global mean."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.wt_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(n_in, n_out, 1, bias=False), nn.Sigmoid())
        self.expansion_layer = CBRs(n_in, n_out, 3, groups=math.gcd(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


#: ImageNet mean and std (RGB, [0, 1] units): the EdgeNets segmentation preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EdgeNetsSegmenter(nn.Module):
    """An EdgeNets segmentation network with its preprocessing: RGB in [0, 1] (B x 3 x H x W, H and W
    multiples of 16) in, raw logits (B x K x H x W) out.

    The float32 arithmetic is upstream's: ``x = (rgb - mean) / std`` with the ImageNet constants.
    Layer names for Z-Mask are those of ``self.net`` prefixed with ``net.``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.model_name = name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - self.mean) / self.std

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        check_multiple_of_16(rgb, self.model_name)
        return self.net(self.preprocess(rgb))


#: The CamVid train split's mean colour (RGB, [0, 1]): the fill of masked pixels, as for espnet_camvid.
CAMVID_MEAN_RGB = (105.03319368755685 / 255, 108.40886315470783 / 255, 110.33102643430219 / 255)

#: Input size of the Cityscapes-trained EdgeNets presets on CamVid: upstream's own protocol
#: (480 x 360 stretched to 1024 x 512, the scale the weights were trained at). Measured on every
#: 5th CamVid val image: mIoU 0.646 (ESPNetv2) / 0.533 (DiCENet) at 512 x 1024 against 0.543 /
#: 0.455 at 368 x 480, the smallest size with sides that are multiples of 16.
CAMVID_EDGENETS_INPUT = (512, 1024)


def cityscapes_on_camvid_profile(name: str, sha256: str, metrics: dict[str, float]) -> ProfileRecord:
    """The record of a Cityscapes-on-CamVid preset's shipped profile: both were fitted the same way
    (``experiments/<name>_fit.yaml``) and evaluated by ``experiments/<name>.yaml``."""
    from .profiles import ProfileRecord

    return ProfileRecord(
        f"{name}.safetensors", sha256,
        "CamVid train (SegNet split, stretched to 512x1024): clean statistics on 120 images, the fusion block on 120 others and "
        f"lambda0 on 80 more with the committed L patch (src/zmask/patches/{name}_L.png, 40 steps); layers chosen on "
        "those images (--layers auto); heatmap grid 128x256, the finest within 1.25x the forward (--max-overhead 0.25); "
        "soft-mask threshold calibrated; seed 0",
        metrics,
        f"zmask fit --config experiments/{name}_fit.yaml",
        f"docs/results/{name}/summary.md (zmask evaluate --config experiments/{name}.yaml); CamVid val (101 images)",
    )


def cityscapes_on_camvid_preset(name: str, description: str, build: Callable[[bool], nn.Module], weights_asset: str,
                                shallow: tuple[str, ...], deep: tuple[str, ...], profile_record: ProfileRecord | None = None) -> ModelPreset:
    """A preset for a Cityscapes-trained EdgeNets segmenter evaluated on CamVid through the declared
    Cityscapes trainId -> CamVid label map (:data:`zmask.data.camvid.CITYSCAPES_TO_CAMVID`)."""
    from ..data.camvid import CAMVID_CLASSES, CAMVID_IGNORE_INDEX, CITYSCAPES_TO_CAMVID
    from ..tasks import SegmentationTask
    from .presets import MASK_DILATION, ModelPreset, camvid_at

    height, width = CAMVID_EDGENETS_INPUT
    return ModelPreset(
        name, SegmentationTask.name, description, build, CAMVID_EDGENETS_INPUT, shallow, deep, (height // 4, width // 4),
        num_classes=len(CAMVID_CLASSES), ignore_index=CAMVID_IGNORE_INDEX, class_names=CAMVID_CLASSES,
        pretrained_source=f"asset {weights_asset}",
        # Not tuned: as espnet_camvid (aligned pooling, the dataset's mean colour as fill, a dilated mask).
        config_overrides=(("pooling", "same"), ("fill_value", CAMVID_MEAN_RGB), ("mask_dilation", MASK_DILATION)),
        datasets=camvid_at(CAMVID_EDGENETS_INPUT), label_map=CITYSCAPES_TO_CAMVID, output_classes=EDGENETS_CITYSCAPES_CLASSES,
        profile_record=profile_record,
    )
