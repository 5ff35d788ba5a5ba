"""ESPNet (Mehta et al., ECCV 2018), p=2 q=8, written from the architecture description.

Module and attribute names reproduce the upstream state-dict keys, so the published CamVid and
Cityscapes weights load with strict key matching. :class:`ESPNetSegmenter` wraps the network with
its exact preprocessing (BGR, mean/std in 0-255 units, then / 255), so callers give RGB in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..assets import asset_path
from ..errors import AssetError, ZMaskError

_BN_EPS = 1e-3


class ConvUnit(nn.Module):
    """C: a bias-free convolution with 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DilatedConv(nn.Module):
    """CDilated: a bias-free 3x3 convolution with dilation ``d`` (size-preserving)."""

    def __init__(self, n_in: int, n_out: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, 3, 1, dilation, dilation=dilation, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class BNPReLU(nn.Module):
    """BR: BatchNorm (eps 1e-3) then per-channel PReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class ConvBNPReLU(nn.Module):
    """CBR: convolution, BatchNorm, PReLU."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=_BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _SpatialPyramid(nn.Module):
    """Shared body of the ESP blocks: reduce, five dilated branches, hierarchical feature fusion."""

    def __init__(self, n_in: int, n_out: int, reduce_kernel: int, reduce_stride: int) -> None:
        super().__init__()
        n = n_out // 5
        self.c1 = ConvUnit(n_in, n, reduce_kernel, reduce_stride)
        self.d1 = DilatedConv(n, n_out - 4 * n, 1)
        self.d2 = DilatedConv(n, n, 2)
        self.d4 = DilatedConv(n, n, 4)
        self.d8 = DilatedConv(n, n, 8)
        self.d16 = DilatedConv(n, n, 16)

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.c1(x)
        s1 = self.d2(reduced)
        s2 = s1 + self.d4(reduced)
        s3 = s2 + self.d8(reduced)
        s4 = s3 + self.d16(reduced)
        return torch.cat([self.d1(reduced), s1, s2, s3, s4], 1)


class DownSamplerB(_SpatialPyramid):
    """Strided ESP block: 3x3/2 reduction, BN + PReLU directly on the block (no residual)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, 3, 2)
        self.bn = nn.BatchNorm2d(n_out, eps=_BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pyramid(x)))


class ESPBlock(_SpatialPyramid):
    """ESP block ("DilatedParllelResidualBlockB"): 1x1 reduction, optional residual, then BR."""

    def __init__(self, n_in: int, n_out: int, add: bool = True) -> None:
        super().__init__(n_in, n_out, 1, 1)
        self.bn = BNPReLU(n_out)
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pyramid(x)
        return self.bn(x + y if self.add else y)


class InputProjection(nn.Module):
    """A chain of ``count`` 3x3/2 average pools over the (normalised) input image."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList([nn.AvgPool2d(3, stride=2, padding=1) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pool in self.pool:
            x = pool(x)
        return x


class ESPNetEncoder(nn.Module):
    """ESPNet-C with p=2 and q=8."""

    def __init__(self, classes: int, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.level1 = ConvBNPReLU(3, 16, 3, 2)
        self.sample1 = InputProjection(1)
        self.sample2 = InputProjection(2)
        self.b1 = BNPReLU(16 + 3)
        self.level2_0 = DownSamplerB(16 + 3, 64)
        self.level2 = nn.ModuleList([ESPBlock(64, 64) for _ in range(p)])
        self.b2 = BNPReLU(128 + 3)
        self.level3_0 = DownSamplerB(128 + 3, 128)
        self.level3 = nn.ModuleList([ESPBlock(128, 128) for _ in range(q)])
        self.b3 = BNPReLU(256)
        self.classifier = ConvUnit(256, classes, 1, 1)


class ESPNet(nn.Module):
    """ESPNet p=2 q=8 returning raw logits (B x classes x H x W) at input resolution.

    ``skip="b1"`` (CamVid weights) feeds the 19-channel b1 output to the last decoder stage;
    ``skip="level1"`` (Cityscapes weights) the 16-channel level-1 output. H and W must be
    multiples of 8.
    """

    def __init__(self, classes: int, skip: str = "b1") -> None:
        super().__init__()
        if skip not in ("b1", "level1"):
            raise ZMaskError(f"skip must be 'b1' (CamVid) or 'level1' (Cityscapes), got {skip!r}")
        self.skip = skip
        self.encoder = ESPNetEncoder(classes)
        self.level3_C = ConvUnit(128 + 3, classes, 1, 1)
        self.br = nn.BatchNorm2d(classes, eps=_BN_EPS)
        self.conv = ConvBNPReLU((19 if skip == "b1" else 16) + classes, classes, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, padding=0, output_padding=0, bias=False))
        self.combine_l2_l3 = nn.Sequential(BNPReLU(2 * classes), ESPBlock(2 * classes, classes, add=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, padding=0, output_padding=0, bias=False), BNPReLU(classes))
        self.classifier = nn.ConvTranspose2d(classes, classes, 2, stride=2, padding=0, output_padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ZMaskError(f"ESPNet needs input height and width that are multiples of 8, got {tuple(x.shape[-2:])}")
        enc = self.encoder
        output0 = enc.level1(x)
        inp1, inp2 = enc.sample1(x), enc.sample2(x)
        output0_cat = enc.b1(torch.cat([output0, inp1], 1))
        output1_0 = enc.level2_0(output0_cat)
        output1 = output1_0
        for block in enc.level2:
            output1 = block(output1)
        output1_cat = enc.b2(torch.cat([output1, output1_0, inp2], 1))
        output2_0 = enc.level3_0(output1_cat)
        output2 = output2_0
        for block in enc.level3:
            output2 = block(output2)
        output2_cat = enc.b3(torch.cat([output2_0, output2], 1))
        output2_c = self.up_l3(self.br(enc.classifier(output2_cat)))
        output1_c = self.level3_C(output1_cat)
        comb = self.up_l2(self.combine_l2_l3(torch.cat([output1_c, output2_c], 1)))
        skip = output0_cat if self.skip == "b1" else output0
        return self.classifier(self.conv(torch.cat([comb, skip], 1)))


@dataclass(frozen=True)
class ESPNetVariant:
    """A published ESPNet weight file with its preprocessing constants (BGR, 0-255 units)."""

    asset: str
    classes: int
    skip: str
    mean_bgr: tuple[float, float, float]
    std_bgr: tuple[float, float, float]
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    ignore_index: int


CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist", "void")
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "void",
)

ESPNET_VARIANTS = {
    "camvid": ESPNetVariant(
        "espnet_camvid", 12, "b1",
        # Per-image BGR mean / population std of the 367 CamVid train PNGs, averaged (float64).
        (110.33102643430219, 108.40886315470783, 105.03319368755685),
        (72.12571015416249, 72.69074533734523, 69.90434816160945),
        (360, 480), CAMVID_CLASSES, 11,
    ),
    "cityscapes": ESPNetVariant(
        "espnet_cityscapes", 20, "level1",
        (72.3923111, 82.90893555, 73.15840149),
        (45.3192215, 46.15289307, 44.91483307),
        (512, 1024), CITYSCAPES_CLASSES, 19,
    ),
}


class ESPNetSegmenter(nn.Module):
    """ESPNet with its own preprocessing: input RGB in [0, 1] (B x 3 x H x W), output logits.

    The float32 arithmetic follows upstream exactly: x = ((255 * rgb)[BGR] - mean) / std / 255.
    Layer names for Z-Mask are those of ``self.net`` prefixed with ``net.``.
    """

    mean_bgr: torch.Tensor
    std_bgr: torch.Tensor

    def __init__(self, variant: ESPNetVariant) -> None:
        super().__init__()
        self.variant = variant
        self.net = ESPNet(variant.classes, variant.skip)
        self.register_buffer("mean_bgr", torch.tensor(variant.mean_bgr, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_bgr", torch.tensor(variant.std_bgr, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        bgr = rgb.flip(1) * 255.0
        return (bgr - self.mean_bgr) / self.std_bgr / 255.0

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(rgb))


def load_state_dict_file(path, description: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a .pth (``weights_only=True``) or .safetensors file."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means an unreadable weight file
        raise AssetError(f"cannot read {description} weights {path}: {error}") from None
    if not isinstance(state, dict):
        raise AssetError(f"{path} does not hold a state dict ({type(state).__name__})")
    return state


def espnet(dataset: str = "camvid", pretrained: bool = True, weights_path=None, download: bool = False) -> ESPNetSegmenter:
    """Build ESPNet for ``dataset`` ('camvid' or 'cityscapes'), with the published weights if ``pretrained``."""
    if dataset not in ESPNET_VARIANTS:
        raise ZMaskError(f"unknown ESPNet variant {dataset!r}; choose one of {sorted(ESPNET_VARIANTS)}")
    variant = ESPNET_VARIANTS[dataset]
    model = ESPNetSegmenter(variant)
    if pretrained or weights_path is not None:
        path = weights_path if weights_path is not None else asset_path(variant.asset, download=download)
        model.net.load_state_dict(load_state_dict_file(path, f"ESPNet-{dataset}"), strict=True)
    return model.eval()
