"""Model factories for ``zmask --model tests.cli.user_factory:NAME`` (tests/cli/test_user_model.py).

``factory`` is what a user writes: a callable returning a wrapped ``nn.Module`` that takes RGB in
[0, 1] and returns segmentation logits at input resolution. The others are deliberate mistakes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinySegmenter(nn.Module):
    """Two strided conv blocks and a 1x1 head, logits upsampled to the input (seeded weights)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, num_classes, 1)
        torch.random.set_rng_state(generator_state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.block(self.stem(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def factory(num_classes: int = 4) -> nn.Module:
    """The user's factory: ``num_classes`` comes from ``--num-classes``."""
    return TinySegmenter(num_classes).eval()


not_callable = 42


def not_a_module() -> str:
    return "a string"
