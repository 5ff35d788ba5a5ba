"""The authors' 3-conv toy network (spec section 8) and helpers shared by tests."""

from __future__ import annotations

import torch
from torch import nn

from zmask import FusionTraining, ZMask, ZMaskConfig


class ToyNet(nn.Module):
    """c1: Conv(3,8,3,s2,p1), c2: Conv(8,16,..), c3: Conv(16,32,..), ReLU after each."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.c3 = nn.Conv2d(16, 32, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))


TOY_CONFIG = ZMaskConfig(
    shallow_layers=("c1", "c2"),
    deep_layers=("c2", "c3"),
    shallow_kernels=((16, 24), (8, 12), (4, 6)),
    deep_kernels=((16, 24), (8, 12)),
    heatmap_size=(48, 64),
)


def seeded_toy(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet().eval()


def clean_batches(count: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 96, 128, generator=generator) * 0.2 + 0.4 for _ in range(count)]


def patched_batch(batch: int = 2, seed: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean-looking images with a high-contrast square, and the square's masks."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 96, 128, generator=generator) * 0.2 + 0.4
    masks = torch.zeros(batch, 1, 96, 128)
    for i in range(batch):
        top = int(torch.randint(0, 96 - size, (1,), generator=generator))
        left = int(torch.randint(0, 128 - size, (1,), generator=generator))
        pattern = (torch.rand(3, size, size, generator=generator) > 0.5).float()
        images[i, :, top : top + size, left : left + size] = pattern
        masks[i, :, top : top + size, left : left + size] = 1
    return images, masks


def fitted_toy_defense(config: ZMaskConfig = TOY_CONFIG, epochs: int = 30) -> ZMask:
    """Z-Mask on the toy network: statistics, fusion block (``epochs``) and threshold fitted on the synthetic squares."""
    defense = ZMask(seeded_toy(), config, seed=0)
    defense.fit_statistics(clean_batches(6))
    patched = [patched_batch(4, seed=s) for s in range(6)]
    clean = [(images, torch.zeros(images.shape[0], 1, *images.shape[2:])) for images in clean_batches(6, 4, seed=9)]
    defense.fit_fusion(patched + clean, FusionTraining(epochs=epochs, batch_size=8, learning_rate=0.05))
    defense.calibrate([patched_batch(4, seed=100 + s) for s in range(3)] + [(c, torch.zeros(4, 1, 96, 128)) for c in clean_batches(3, 4, seed=50)])
    return defense
