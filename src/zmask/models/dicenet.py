"""DiCENet segmentation, s = 1.75 (Mehta et al., 2019; sacmehta/EdgeNets), written from the
architecture description (``ARCHITECTURES_more.md`` part F).

Module and attribute names reproduce the upstream state-dict keys, so the published Cityscapes
weights load with strict key matching. The dimension-wise convolutions have a fixed size D (28 in
level 3, 14 in level 4: upstream built the model for 224 x 224); feature maps are resized to D
rows / columns around them, so any input whose sides are multiples of 16 works. :func:`dicenet`
returns the network inside an :class:`~zmask.models.edgenets.EdgeNetsSegmenter`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import asset_path
from .edgenets import (
    EDGENETS_CITYSCAPES_CLASSES, BRs, CBRs, EdgeNetsSegmenter, EfficientPWConv, EfficientPyrPool, Shuffle, bilinear_ac, bn_prelu,
    check_multiple_of_16,
)
from .espnet import load_state_dict_file


def _resize_axis(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Resize dimension ``axis`` (2 = height, 3 = width) of ``x`` to ``size``: bilinear
    (align_corners=True) when growing, adaptive average pooling when shrinking."""
    current = x.shape[axis]
    if current == size:
        return x
    target = (size, x.shape[3]) if axis == 2 else (x.shape[2], size)
    return bilinear_ac(x, target) if current < size else F.adaptive_avg_pool2d(x, target)


class DICE(nn.Module):
    """Dimension-wise convolution (channel, height, width branches), dimension-wise fusion, and a
    grouped 3x3 projection gated per channel."""

    def __init__(self, n_in: int, n_out: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv_channel = nn.Conv2d(n_in, n_in, 3, 1, 1, groups=n_in, bias=False)
        self.conv_width = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.conv_height = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.br_act = BRs(3 * n_in)
        self.weight_avg_layer = CBRs(3 * n_in, n_in, 1, groups=n_in)
        self.proj_layer = CBRs(n_in, n_out, 3, groups=math.gcd(n_in, n_out))
        self.linear_comb_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(n_in, n_in // 4, 1, bias=False), nn.ReLU(),
            nn.Conv2d(n_in // 4, n_out, 1, bias=False), nn.Sigmoid(),
        )
        self.vol_shuffle = Shuffle(3)

    def _along(self, x: torch.Tensor, axis: int, conv: nn.Conv2d) -> torch.Tensor:
        """Resize ``axis`` to D, move it to the channel position, convolve, move it back, resize back."""
        size = x.shape[axis]
        t = _resize_axis(x, axis, self.dim).transpose(1, axis)
        t = conv(t).transpose(1, axis)
        return _resize_axis(t, axis, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = torch.cat([self.conv_channel(x), self._along(x, 2, self.conv_height), self._along(x, 3, self.conv_width)], 1)
        y = self.weight_avg_layer(self.vol_shuffle(self.br_act(fused)))
        return self.proj_layer(y) * self.linear_comb_layer(y)


class StridedDICE(nn.Module):
    """Down-sampling unit: depthwise strided conv (left) next to avg-pool + DICE (right), shuffled."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.left_layer = nn.Sequential(CBRs(channels, channels, 3, 2, groups=channels), CBRs(channels, channels, 1))
        self.right_layer = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), DICE(channels, channels, dim), CBRs(channels, channels, 1))
        self.shuffle = Shuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(torch.cat([self.left_layer(x), self.right_layer(x)], 1))


class ShuffleDICEBlock(nn.Module):
    """The first half of the channels passes through; the rest goes through 1x1 + DICE; shuffled."""

    def __init__(self, n_in: int, n_out: int, dim: int) -> None:
        super().__init__()
        self.split = round(0.5 * n_in)
        self.layer_right = nn.Sequential(CBRs(n_in - self.split, n_out - self.split, 1),
                                         DICE(n_out - self.split, n_out - self.split, dim))
        self.shuffle = Shuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(torch.cat([x[:, : self.split], self.layer_right(x[:, self.split :])], 1))


class DiCENetEncoder(nn.Module):
    """The DiCENet encoder up to level 4 (channels 24, 24, 210, 420 for s = 1.75)."""

    def __init__(self) -> None:
        super().__init__()
        self.level1 = CBRs(3, 24, 3, 2)
        self.level2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.level3 = nn.Sequential(StridedDICE(24, 28), ShuffleDICEBlock(48, 210, 28),
                                    *(ShuffleDICEBlock(210, 210, 28) for _ in range(2)))
        self.level4 = nn.Sequential(StridedDICE(210, 14), *(ShuffleDICEBlock(420, 420, 14) for _ in range(7)))


class DiCENet(nn.Module):
    """DiCENet segmentation (s = 1.75): normalised image (B x 3 x H x W, H and W multiples of 16) ->
    raw logits B x classes x H x W."""

    def __init__(self, classes: int = 20) -> None:
        super().__init__()
        self.base_net = DiCENetEncoder()
        proj = min(classes // 2, 16)
        self.eff_pool_16x16 = EfficientPyrPool(420, proj, 64)
        self.proj_enc_32x32 = EfficientPWConv(210, 64)
        self.bu_br_32x32 = bn_prelu(64)
        self.eff_pool_32x32 = EfficientPyrPool(64, proj, 48)
        self.proj_enc_64x64 = EfficientPWConv(24, 48)
        self.bu_br_64x64 = bn_prelu(48)
        self.eff_pool_64x64 = EfficientPyrPool(48, proj, 32)
        self.proj_enc_128x128 = EfficientPWConv(24, 32)
        self.bu_br_128x128 = bn_prelu(32)
        self.eff_pool_128x128 = EfficientPyrPool(32, proj, classes, last=True)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple_of_16(x, "DiCENet")
        enc = self.base_net
        e1 = enc.level1(x)
        e2 = enc.level2(e1)
        e3 = enc.level3(e2)
        e4 = enc.level4(e3)
        y = self.eff_pool_16x16(e4)
        y = self.eff_pool_32x32(self.bu_br_32x32(self.proj_enc_32x32(e3) + self.upsample(y)))
        y = self.eff_pool_64x64(self.bu_br_64x64(self.proj_enc_64x64(e2) + self.upsample(y)))
        y = self.eff_pool_128x128(self.bu_br_128x128(self.proj_enc_128x128(e1) + self.upsample(y)))
        return bilinear_ac(y, (int(x.shape[-2]), int(x.shape[-1])))


def dicenet(pretrained: bool = True, weights_path: str | Path | None = None) -> EdgeNetsSegmenter:
    """DiCENet s = 1.75 in its wrapper, with the published Cityscapes weights (asset
    ``dicenet_cityscapes``, SHA-256 checked) if ``pretrained`` or ``weights_path`` is given."""
    model = EdgeNetsSegmenter(DiCENet(len(EDGENETS_CITYSCAPES_CLASSES)), "DiCENet")
    if pretrained or weights_path is not None:
        path = weights_path if weights_path is not None else asset_path("dicenet_cityscapes")
        model.net.load_state_dict(load_state_dict_file(path, "DiCENet-Cityscapes"), strict=True)
    return model.eval()


_LAYERS = ("net.base_net.level3.0.left_layer.0", "net.base_net.level3.0.left_layer.0.cbr.0", "net.proj_enc_32x32.expansion_layer.cbr.0")


def _profile_record():
    from .edgenets import cityscapes_on_camvid_profile

    return cityscapes_on_camvid_profile(
        "dicenet_camvid", "8662bd66945eec7f1e4a70d7dc078d0cdfd124152aa8378e2d3c0635a73e4812",
        {"lambda0": 0.4124, "calibration_auc": 1.000, "calibration_mask_iou": 0.890, "val_miou_clean": 0.527, "val_miou_L_patch": 0.350,
         "val_miou_L_patch_zmask": 0.493, "val_recovery_L_patch": 0.808, "val_tpr_L_patch": 1.000, "val_clean_flag_rate": 0.000,
         "val_random_noise_flag_rate": 1.000, "val_mask_iou_L_patch": 0.898},
    )


def _register() -> None:
    from .edgenets import cityscapes_on_camvid_preset
    from .presets import register_preset

    register_preset(cityscapes_on_camvid_preset(
        "dicenet_camvid",
        "DiCENet s=1.75 trained on Cityscapes (project definition, upstream weights), evaluated on CamVid through the "
        "Cityscapes -> CamVid label map, CamVid stretched to 512x1024 as upstream (upstream CamVid val mIoU 0.528)",
        lambda pretrained: dicenet(pretrained=pretrained), "dicenet_cityscapes",
        # Chosen on CamVid train by `zmask fit --layers auto` (experiments/dicenet_camvid_fit.yaml):
        # the first 1/8 unit's left branch and the 1/8 encoder projection separate patched from
        # clean images (AUC 1.000) and localise the patch best (inside/outside heat 148, 137, 135).
        # The first hand-picked set, by analogy with espnet_camvid (level1, level2, level3.0 /
        # level3), had level1 at AUC 0.50 and level3 at 0.93 with inside/outside 5.0.
        _LAYERS, _LAYERS, _profile_record(),
    ))


_register()
