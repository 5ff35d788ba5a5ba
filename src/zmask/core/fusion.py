"""The 8-parameter fusion and detection block, its detection score, and its training."""

from __future__ import annotations

import logging
import math

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import ConfigError

logger = logging.getLogger(__name__)

PARAMETER_NAMES = ("a1", "b1", "a2", "b2", "c1", "e1", "c2", "e2")

# Key pairs (weight, bias) of the authors' checkpoint, where the block is stored as 1x1 convolutions.
_AUTHORS_KEYS = {
    ("a1", "b1"): "MaskBlock.conv_block_2A",
    ("a2", "b2"): "MaskBlock.conv_block_1A",
    ("c1", "e1"): "MaskBlock.conv_block_2B",
    ("c2", "e2"): "MaskBlock.conv_block_head",
}
_AUTHORS_UNUSED = ("MaskBlock.weight", "MaskBlock.bias")


class FusionBlock(nn.Module):
    """Two soft-threshold units turning (H_S, H_D) into a soft patch mask.

    ROI = sigmoid(a2 * tanh(a1 * H_D + b1) + b2);
    M~  = sigmoid(c2 * tanh(c1 * (H_S * ROI) + e1) + e2).
    Parameters start uniform in [0, 1] (as the authors' code), drawn from ``generator``.
    """

    a1: nn.Parameter
    b1: nn.Parameter
    a2: nn.Parameter
    b2: nn.Parameter
    c1: nn.Parameter
    e1: nn.Parameter
    c2: nn.Parameter
    e2: nn.Parameter

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        initial = torch.rand(len(PARAMETER_NAMES), generator=generator)
        for name, value in zip(PARAMETER_NAMES, initial):
            self.register_parameter(name, nn.Parameter(value.clone()))

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        roi = torch.sigmoid(self.a2 * torch.tanh(self.a1 * deep + self.b1) + self.b2)
        return torch.sigmoid(self.c2 * torch.tanh(self.c1 * (shallow * roi) + self.e1) + self.e2)

    def values(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in PARAMETER_NAMES}

    def load_values(self, values: Mapping[str, float | torch.Tensor]) -> None:
        missing = [n for n in PARAMETER_NAMES if n not in values]
        if missing:
            raise ConfigError(f"fusion parameters {missing} are missing")
        with torch.no_grad():
            for name in PARAMETER_NAMES:
                value = torch.as_tensor(values[name], dtype=torch.float32).reshape(())
                if not torch.isfinite(value):
                    raise ConfigError(f"fusion parameter {name} is not finite")
                getattr(self, name).copy_(value)

    @classmethod
    def from_authors_checkpoint(cls, path: str | Path) -> FusionBlock:
        """Load the Z-Mask authors' trained block (a plain state dict of 1x1 convolutions)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ConfigError(f"cannot read fusion checkpoint {path}: {error}") from None
        expected = {f"{prefix}.{kind}" for prefix in _AUTHORS_KEYS.values() for kind in ("weight", "bias")}
        if not isinstance(state, Mapping) or not expected <= set(state):
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ConfigError(f"{path} is not a Z-Mask fusion checkpoint: expected keys {sorted(expected)}, found {found}")
        values = {}
        for (weight_name, bias_name), prefix in _AUTHORS_KEYS.items():
            weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
            if weight.numel() != 1 or bias.numel() != 1:
                raise ConfigError(f"{path}: {prefix} must hold one weight and one bias, got shapes {tuple(weight.shape)}, {tuple(bias.shape)}")
            values[weight_name], values[bias_name] = weight.reshape(()), bias.reshape(())
        block = cls()
        block.load_values(values)
        return block


def detection_score(shallow: torch.Tensor, deep: torch.Tensor, soft_mask: torch.Tensor, definition: str = "reference") -> torch.Tensor:
    """Score d per sample (shape B).

    ``reference`` (authors' code): sum(H_S H_D M~) / (1 + sum M~);
    ``paper``: ||H_S H_D M~||_1 / ||M~||_1.
    """
    weighted = (shallow * deep * soft_mask).flatten(1)
    mass = soft_mask.flatten(1).sum(1)
    if definition == "reference":
        return weighted.sum(1) / (1.0 + mass)
    if definition == "paper":
        return weighted.abs().sum(1) / mass.clamp(min=torch.finfo(mass.dtype).tiny)
    raise ConfigError(f"unknown score definition {definition!r}; use 'reference' or 'paper'")


def fuse_and_score(fusion: nn.Module, shallow: torch.Tensor, deep: torch.Tensor, definition: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """(soft mask M~, score d): the fusion block applied to (H_S, H_D), then :func:`detection_score`."""
    soft = fusion(shallow, deep)
    return soft, detection_score(shallow, deep, soft, definition)


@dataclass(frozen=True)
class FusionTraining:
    """Settings of :func:`train_fusion` (defaults: the authors' Adam lr 0.01, batch 15).
    ``min_steps``: train for more epochs when ``epochs`` would give fewer optimiser steps than
    this; a small training set otherwise leaves the block near its random start."""

    epochs: int = 15
    batch_size: int = 15
    learning_rate: float = 0.01
    seed: int = 0
    min_steps: int = 0


def train_fusion(
    block: FusionBlock,
    shallow: torch.Tensor,
    deep: torch.Tensor,
    targets: torch.Tensor,
    settings: FusionTraining = FusionTraining(),
    progress: bool = False,
) -> list[float]:
    """Fit the block with pixel-wise BCE against binary patch masks; returns the mean loss per epoch.

    ``shallow``, ``deep``, ``targets``: N x 1 x H_R x W_R precomputed heatmaps and patch masks
    (all-zero targets for clean images). The shuffling order comes from ``settings.seed``.
    """
    from tqdm.auto import tqdm

    if not (shallow.shape == deep.shape == targets.shape) or shallow.dim() != 4 or shallow.shape[0] == 0:
        raise ConfigError(
            f"heatmaps and targets must be N x 1 x H x W of one shape with N > 0, got "
            f"{tuple(shallow.shape)}, {tuple(deep.shape)}, {tuple(targets.shape)}"
        )
    if settings.epochs < 1 or settings.batch_size < 1 or settings.learning_rate <= 0 or settings.min_steps < 0:
        raise ConfigError(f"invalid training settings {settings}")
    targets = targets.float()
    if ((targets != 0) & (targets != 1)).any():
        raise ConfigError("targets must be binary patch masks (0 or 1)")
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(block.parameters(), lr=settings.learning_rate)
    history = []
    block.train()
    batches_per_epoch = math.ceil(shallow.shape[0] / settings.batch_size)
    epochs = max(settings.epochs, math.ceil(settings.min_steps / batches_per_epoch))
    for _ in tqdm(range(epochs), desc="fusion", disable=not progress):
        order = torch.randperm(shallow.shape[0], generator=generator)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size].to(shallow.device)
            prediction = block(shallow[index], deep[index])
            loss = F.binary_cross_entropy(prediction, targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        history.append(total / len(order))
    block.eval()
    logger.debug("fusion block trained for %d epochs on %d samples: loss %.4f -> %.4f", epochs, shallow.shape[0], history[0], history[-1])
    return history
