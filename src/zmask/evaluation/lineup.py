"""The defenses compared in an evaluation, built from the registry and fitted on training images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..contracts import Defense, FitContext, ObservingDefense
from ..data.batching import image_batches
from ..defense import ZMask
from ..errors import ZMaskError
from .defenses import DEFENSES, NoDefense
from .fitting import FitPlan, patched_batches


def fit_context(model: nn.Module, zmask: ZMask, train: Dataset, patches: Sequence[torch.Tensor], seed: int = 0,
                progress: bool = True, batch_size: int = 8, **options: Any) -> FitContext:
    """The training data every defense fits on: clean batches, and the patches at random positions on
    half of the training images (the fusion block's kind of data)."""
    clean = image_batches(train, batch_size)
    labelled = patched_batches(train, patches, batch_size, FitPlan().eot, seed + 7) if patches else []
    return FitContext(model, zmask, train, list(patches), clean, labelled, seed, progress, options)


def build_defenses(
    model: nn.Module, zmask: ZMask, train: Dataset, patches: Sequence[torch.Tensor], names: Sequence[str],
    seed: int = 0, progress: bool = True, batch_size: int = 8, masknet_epochs: int = 6,
) -> tuple[list[Any], list[Any]]:
    """(masking defenses, detectors) for the registered defenses ``names``, each fitted on ``train``.

    Detection-only defenses that observe the undefended pass (HN, FPDA) are attached to "none",
    which is built whenever they are requested.
    """
    classes = [DEFENSES.get(name) for name in names]  # unknown names fail before any fitting
    context = fit_context(model, zmask, train, patches, seed, progress, batch_size, masknet_epochs=masknet_epochs)
    masking: list[Defense] = []
    detectors: list[Defense] = []
    observers: list[ObservingDefense] = []
    undefended: NoDefense | None = None
    for name, cls in zip(names, classes):
        defense = cls.build(context)
        if getattr(cls, "observes_undefended", False):
            if not isinstance(defense, ObservingDefense):
                raise ZMaskError(f"defense {name!r} observes the undefended pass but has no layers and observe(activations)")
            observers.append(defense)
        elif isinstance(defense, NoDefense):
            undefended = defense
        else:
            (masking if cls.masks else []).append(defense)
            (detectors if cls.detects else []).append(defense)
    if undefended is not None or observers:
        undefended = undefended or NoDefense.build(context)
        undefended.observers = observers
        masking.append(undefended)
    return masking, detectors + observers
