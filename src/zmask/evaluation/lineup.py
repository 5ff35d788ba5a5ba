"""The defenses compared in an evaluation, with the learned baselines fitted on training images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.calibration import calibrate_threshold
from ..core.capture import ActivationCapture
from ..defense import ZMask
from ..errors import ZMaskError
from .baselines import CoverageScore, HyperNeuronScore, MaskNet, train_masknet
from .defenses import LGSDefense, MaskNetDefense, NoDefense, ScoreDefense, ZMaskDefense
from .fitting import FitPlan, patched_batches

DEFENSE_NAMES = ("zmask", "masknet", "lgs", "none", "hn", "fpda")


def deepest_layer(model: nn.Module, layers: Sequence[str], probe: torch.Tensor) -> str:
    """The layer of ``layers`` with the coarsest output (smallest H x W, then most channels)."""
    with torch.no_grad(), ActivationCapture(model, layers) as capture:
        model(probe)
    shapes = {name: capture.activations[name].shape for name in layers}
    return min(layers, key=lambda name: (shapes[name][-2] * shapes[name][-1], -shapes[name][1]))


def build_defenses(
    model: nn.Module, zmask: ZMask, train: Dataset, patches: Sequence[torch.Tensor], names: Sequence[str],
    seed: int = 0, progress: bool = True, batch_size: int = 8, masknet_epochs: int = 6,
) -> tuple[list[Any], list[Any]]:
    """(masking defenses, detectors) for ``names``.

    MaskNet trains on the same kind of data as the fusion block (the patches at random positions on
    half of the training images); HN and FPDA take their clean statistics from the training images
    and their thresholds from the ROC on the patched ones, like Z-Mask's lambda0. HN and FPDA observe
    the undefended forward pass, so "none" is built whenever they are requested.
    """
    unknown = [name for name in names if name not in DEFENSE_NAMES]
    if unknown:
        raise ZMaskError(f"unknown defense {unknown[0]!r}; choose from {', '.join(DEFENSE_NAMES)}")
    masking, detectors, observers = [], [], []
    clean_batches = [torch.stack([train[i]["image"] for i in range(s, min(s + batch_size, len(train)))]) for s in range(0, len(train), batch_size)]
    labelled = patched_batches(train, patches, batch_size, FitPlan().eot, seed + 7) if patches else []
    for name in names:
        if name == "zmask":
            masking.append(ZMaskDefense(zmask))
            detectors.append(masking[-1])
        elif name == "lgs":
            masking.append(LGSDefense(model))
        elif name == "masknet":
            if not labelled:
                raise ZMaskError("MaskNet needs adversarial patches to train on: pass at least one patch")
            net = MaskNet(seed=seed)
            train_masknet(net, labelled, epochs=masknet_epochs, seed=seed, progress=progress)
            masking.append(MaskNetDefense(model, net))
        elif name in ("hn", "fpda"):
            layer = deepest_layer(model, zmask.config.deep_layers, clean_batches[0][:1])
            scorer = (HyperNeuronScore if name == "hn" else CoverageScore)(model, layer).fit(clean_batches, progress)
            threshold = None
            if labelled:
                scores = torch.cat([scorer.score(images) for images, _ in labelled])
                patched = torch.cat([masks.flatten(1).amax(1) > 0 for _, masks in labelled])
                if patched.any() and (~patched).any():
                    threshold = calibrate_threshold(scores[~patched], scores[patched]).threshold
            observers.append(ScoreDefense(name, model, scorer, threshold))
    if "none" in names or observers:
        masking.append(NoDefense(model, observers))
    return masking, detectors + observers
