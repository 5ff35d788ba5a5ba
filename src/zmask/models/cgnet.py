"""CGNet, M = 3, N = 21 (Wu et al., IEEE TIP 2020; wutianyiRosun/CGNet), written from the
architecture description (``ARCHITECTURES_more.md`` part G).

Module and attribute names reproduce the upstream state-dict keys, so the published CamVid
checkpoint loads with strict key matching. :class:`CGNetSegmenter` wraps the network with its
exact preprocessing, including upstream's quirk: the BGR-ordered mean (0-255 units) is subtracted
from RGB-ordered pixels, with no scaling. Callers give RGB in [0, 1]. The checkpoint was trained
on CamVid train + val, so scores on CamVid val are optimistic.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import asset_path
from ..errors import AssetError, InputError
# The same blocks as ESPNet (keys conv/bn/act, BatchNorm eps 1e-3).
from .espnet import BNPReLU as BR
from .espnet import ConvBNPReLU as CBR
from .espnet import load_state_dict_file

_BN_EPS = 1e-3

#: The 11 outputs: CamVid ids 0..10 (no void output).
CGNET_CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist")

#: Upstream's CamVid mean, per channel in BGR order (0-255 units; float32 values of its
#: ``CamVidTrainInform`` over the 468 train+val images). Upstream subtracts it, in this order,
#: from RGB-ordered pixels: R - 105.66, G - 103.33, B - 99.63.
CGNET_CAMVID_MEAN_BGR = (105.65775299072266, 103.329833984375, 99.62540435791016)


class C(nn.Module):
    """A bias-free convolution with 'same' padding (key ``conv``)."""

    def __init__(self, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, 1, (kernel - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 convolution with dilation ``dilation`` (F_loc: 1, F_sur: > 1), padding = dilation."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, dilation, dilation=dilation, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FGlo(nn.Module):
    """Global context: a squeeze-and-excitation gate with biased linear layers."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(n, c)).view(n, c, 1, 1)


class CGDown(nn.Module):
    """Down-sampling context-guided block: 3x3/2 conv (named ``conv1x1`` upstream), local and
    surrounding context, BN + PReLU, 1x1 reduction, global context. No residual."""

    def __init__(self, n_in: int, n_out: int, dilation: int, reduction: int) -> None:
        super().__init__()
        self.conv1x1 = CBR(n_in, n_out, 3, 2)
        self.F_loc = DepthwiseConv(n_out)
        self.F_sur = DepthwiseConv(n_out, dilation)
        self.bn = nn.BatchNorm2d(2 * n_out, eps=_BN_EPS)
        self.act = nn.PReLU(2 * n_out)
        self.reduce = C(2 * n_out, n_out, 1)
        self.F_glo = FGlo(n_out, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.conv1x1(x)
        joint = self.act(self.bn(torch.cat([self.F_loc(o), self.F_sur(o)], 1)))
        return self.F_glo(self.reduce(joint))


class CGBlock(nn.Module):
    """Context-guided block: 1x1 to half the channels, local and surrounding context, BN + PReLU,
    global context, then the residual."""

    def __init__(self, channels: int, dilation: int, reduction: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1x1 = CBR(channels, half, 1)
        self.F_loc = DepthwiseConv(half)
        self.F_sur = DepthwiseConv(half, dilation)
        self.bn_prelu = BR(channels)
        self.F_glo = FGlo(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.conv1x1(x)
        return x + self.F_glo(self.bn_prelu(torch.cat([self.F_loc(o), self.F_sur(o)], 1)))


class InputInjection(nn.Module):
    """``count`` successive 3x3/2 average pools of the (preprocessed) input image."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList([nn.AvgPool2d(3, stride=2, padding=1) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pool in self.pool:
            x = pool(x)
        return x


class CGNet(nn.Module):
    """CGNet M = 3, N = 21: preprocessed image (B x 3 x H x W, any size) -> raw logits B x classes x H x W."""

    def __init__(self, classes: int = 11, m: int = 3, n: int = 21) -> None:
        super().__init__()
        self.level1_0 = CBR(3, 32, 3, 2)
        self.level1_1 = CBR(32, 32, 3)
        self.level1_2 = CBR(32, 32, 3)
        self.sample1 = InputInjection(1)
        self.sample2 = InputInjection(2)
        self.b1 = BR(32 + 3)
        self.level2_0 = CGDown(32 + 3, 64, dilation=2, reduction=8)
        self.level2 = nn.ModuleList([CGBlock(64, dilation=2, reduction=8) for _ in range(m - 1)])
        self.bn_prelu_2 = BR(128 + 3)
        self.level3_0 = CGDown(128 + 3, 128, dilation=4, reduction=16)
        self.level3 = nn.ModuleList([CGBlock(128, dilation=4, reduction=16) for _ in range(n - 1)])
        self.bn_prelu_3 = BR(256)
        self.classifier = nn.Sequential(C(256, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"CGNet expects a B x 3 x H x W batch, got shape {tuple(x.shape)}")
        stage1 = self.level1_2(self.level1_1(self.level1_0(x)))
        stage1 = self.b1(torch.cat([stage1, self.sample1(x)], 1))
        down2 = self.level2_0(stage1)
        stage2 = down2
        for block in self.level2:
            stage2 = block(stage2)
        stage2 = self.bn_prelu_2(torch.cat([stage2, down2, self.sample2(x)], 1))
        down3 = self.level3_0(stage2)
        stage3 = down3
        for block in self.level3:
            stage3 = block(stage3)
        stage3 = self.bn_prelu_3(torch.cat([down3, stage3], 1))
        return F.interpolate(self.classifier(stage3), size=(int(x.shape[-2]), int(x.shape[-1])), mode="bilinear", align_corners=False)


class CGNetSegmenter(nn.Module):
    """CGNet with its own preprocessing: RGB in [0, 1] (B x 3 x H x W) in, logits (B x 11 x H x W) out.

    ``x = 255 * rgb - mean_bgr`` channel by channel in RGB position (upstream's order quirk; no
    std, no /255). Layer names for Z-Mask are those of ``self.net`` prefixed with ``net.``.
    """

    mean: torch.Tensor

    def __init__(self, classes: int = len(CGNET_CAMVID_CLASSES), mean: tuple[float, float, float] = CGNET_CAMVID_MEAN_BGR) -> None:
        super().__init__()
        self.net = CGNet(classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb * 255.0 - self.mean

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise InputError(f"CGNet expects a B x 3 x H x W RGB batch in [0, 1], got shape {tuple(rgb.shape)}")
        return self.net(self.preprocess(rgb))


def cgnet(pretrained: bool = True, weights_path: str | Path | None = None) -> CGNetSegmenter:
    """CGNet M3N21 in its wrapper, with the published CamVid (train+val) weights (asset
    ``cgnet_camvid``, SHA-256 checked) if ``pretrained`` or ``weights_path`` is given."""
    model = CGNetSegmenter()
    if pretrained or weights_path is not None:
        path = weights_path if weights_path is not None else asset_path("cgnet_camvid")
        state = load_state_dict_file(path, "CGNet-CamVid")
        if "model" in state and isinstance(state["model"], dict):  # upstream checkpoint: {'epoch', 'model'}
            state = state["model"]
        if not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise AssetError(f"{path} is not a CGNet checkpoint (expected tensors, or a dict with a 'model' state dict)")
        model.net.load_state_dict(state, strict=True)
    return model.eval()


def _profile_record():
    from .profiles import ProfileRecord

    return ProfileRecord(
        "cgnet_camvid.safetensors",
        "eba459ef1db35053b232ba18a649bff52cb8d14f9d22daecc4c89be901d9b48e",
        "CamVid train (SegNet split, 360x480; the checkpoint was also trained on CamVid val): clean statistics on 120 images, "
        "the fusion block on 120 others and lambda0 on 80 more with the committed L patch (src/zmask/patches/cgnet_camvid_L.png); "
        "the preset's layers; heatmap grid 45x60, the finest within 1.25x the forward (--max-overhead 0.25); soft-mask "
        "threshold calibrated; seed 0",
        {"lambda0": 0.8226, "calibration_auc": 1.000, "calibration_mask_iou": 0.803, "val_miou_clean": 0.857, "val_miou_L_patch": 0.561,
         "val_miou_L_patch_zmask": 0.802, "val_recovery_L_patch": 0.816, "val_tpr_L_patch": 1.000, "val_clean_flag_rate": 0.000,
         "val_random_noise_flag_rate": 0.000, "val_mask_iou_L_patch": 0.798},
        "zmask fit --config experiments/cgnet_camvid_fit.yaml",
        "docs/results/cgnet_camvid/summary.md (zmask evaluate --config experiments/cgnet_camvid.yaml); CamVid val (101 images)",
    )


def _register() -> None:
    from ..data.camvid import CAMVID_IGNORE_INDEX
    from ..tasks import SegmentationTask
    from .edgenets import CAMVID_MEAN_RGB
    from .presets import MASK_DILATION, ModelPreset, _camvid, register_preset

    register_preset(ModelPreset(
        "cgnet_camvid", SegmentationTask.name,
        "CGNet M3N21 trained on CamVid train+val (project definition, upstream weights); CamVid val was in its training "
        "set, so its val scores are optimistic (upstream CamVid val mIoU 0.857)",
        lambda pretrained: cgnet(pretrained=pretrained), (360, 480),
        # ARCHITECTURES_more.md part K, by analogy with espnet_camvid (CGNet has the same stage layout):
        # stage-1 output with the image (1/2), stage-2 output with the image (1/4) and the stage-3
        # down-sampler (1/8) as S; the classifier input (1/8) as context in D.
        ("net.b1", "net.bn_prelu_2", "net.level3_0"),
        ("net.b1", "net.bn_prelu_3", "net.bn_prelu_2"),
        (90, 120), num_classes=len(CGNET_CAMVID_CLASSES), ignore_index=CAMVID_IGNORE_INDEX, class_names=CGNET_CAMVID_CLASSES,
        pretrained_source="asset cgnet_camvid",
        # Not tuned: as espnet_camvid (aligned pooling, the dataset's mean colour as fill, a dilated mask).
        config_overrides=(("pooling", "same"), ("fill_value", CAMVID_MEAN_RGB), ("mask_dilation", MASK_DILATION)),
        datasets=_camvid, profile_record=_profile_record(),
    ))


_register()
