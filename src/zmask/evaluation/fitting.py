"""Fitting Z-Mask on a real model end to end, and the per-layer evidence for choosing S and D."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ..attacks import EOTConfig, apply_patch
from ..config import ZMaskConfig
from ..core.capture import ActivationCapture
from ..core.fusion import FusionTraining
from ..core.refinement import LayerRefiner
from ..core.statistics import resize_nearest
from ..defense import ZMask
from ..errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitPlan:
    """How the training split is divided: statistics images, fusion images, calibration images.
    ``placements``: how many times each fusion / calibration image is drawn (clean or with a patch
    at a fresh random place); above 1 it stretches a small training split. ``target_fpr``: choose
    lambda0 for at most this false-positive rate on the clean calibration images (None: Youden's J).
    ``hard_negatives``: share of the clean fusion and calibration samples that carry a harmless
    occluder (noise or a crop of another image) labelled "no patch" (:func:`patched_batches`)."""

    statistics_images: int = 120
    fusion_images: int = 120
    calibration_images: int = 80
    batch_size: int = 8
    placements: int = 1
    fusion: FusionTraining = FusionTraining(epochs=40, batch_size=15, learning_rate=0.01, min_steps=300)
    eot: EOTConfig = EOTConfig(scale=(0.8, 1.2), noise_std=0.0, contrast=0.0, quantize=True)
    seed: int = 0
    target_fpr: float | None = None
    hard_negatives: float = 0.0


def _split(dataset: Dataset, plan: FitPlan) -> tuple[Subset, Subset, Subset]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(plan.seed)).tolist()
    first = plan.statistics_images
    second = first + plan.fusion_images
    third = second + plan.calibration_images
    return Subset(dataset, order[:first]), Subset(dataset, order[first:second]), Subset(dataset, order[second:third])


def patched_batches(dataset: Dataset, patches: Sequence[torch.Tensor], batch_size: int, eot: EOTConfig, seed: int, clean_share: float = 0.5,
                    placements: int = 1, hard_negatives: float = 0.0):
    """(images, masks) batches: each image gets a random patch of ``patches`` at a random place, or
    stays clean (empty mask) with probability ``clean_share``; the dataset is gone through
    ``placements`` times with fresh draws. Deterministic for a seed.

    ``hard_negatives``: the share of the clean samples that get a harmless occluder of a patch's
    size - uniform random noise, or a crop of another image of ``dataset`` (half each) - and
    still an empty mask, so that a flag learnt or calibrated on them means "adversarial patch"
    rather than "something unusual is in the picture". 0 is the paper's training.
    """
    if placements < 1:
        raise ConfigError(f"placements={placements} must be at least 1")
    if not 0.0 <= hard_negatives <= 1.0:
        raise ConfigError(f"hard_negatives={hard_negatives} must lie in [0, 1]")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    order = [index for _ in range(placements) for index in range(len(dataset))]
    for start in range(0, len(order), batch_size):
        images, masks = [], []
        for index in order[start : start + batch_size]:
            image = dataset[index]["image"]
            if float(torch.rand((), generator=generator)) < clean_share:
                if hard_negatives and float(torch.rand((), generator=generator)) < hard_negatives:
                    size = tuple(patches[int(torch.randint(0, len(patches), (), generator=generator))].shape[-2:])
                    occluder = _occluder(dataset, index, size, generator)
                    image = apply_patch(image[None], occluder, generator, eot).images[0]
                images.append(image)
                masks.append(torch.zeros(1, *image.shape[-2:]))
                continue
            patch = patches[int(torch.randint(0, len(patches), (), generator=generator))]
            placed = apply_patch(image[None], patch, generator, eot)
            images.append(placed.images[0])
            masks.append(placed.masks[0])
        batches.append((torch.stack(images), torch.stack(masks)))
    return batches


def _occluder(dataset: Dataset, index: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A harmless occluder of ``size``: uniform 8-bit noise, or a crop of another image of the dataset."""
    channels = dataset[index]["image"].shape[0]
    if float(torch.rand((), generator=generator)) < 0.5 or len(dataset) < 2:
        return torch.randint(0, 256, (channels, *size), generator=generator).float() / 255
    other = dataset[(index + 1 + int(torch.randint(0, len(dataset) - 1, (), generator=generator))) % len(dataset)]["image"]
    height, width = min(size[0], other.shape[-2]), min(size[1], other.shape[-1])
    top = int(torch.randint(0, other.shape[-2] - height + 1, (), generator=generator))
    left = int(torch.randint(0, other.shape[-1] - width + 1, (), generator=generator))
    return other[:, top : top + height, left : left + width].clone()


def fit_zmask(model: torch.nn.Module, config: ZMaskConfig, dataset: Dataset, patches: Sequence[torch.Tensor],
              plan: FitPlan = FitPlan(), progress: bool = True) -> tuple[ZMask, dict[str, Any]]:
    """Statistics on clean training images, fusion on patched ones, lambda0 by ROC on a third share."""
    statistics_set, fusion_set, calibration_set = _split(dataset, plan)
    defense = ZMask(model, config, seed=plan.seed)
    loader = [torch.stack([statistics_set[i]["image"] for i in range(s, min(s + plan.batch_size, len(statistics_set)))])
              for s in range(0, len(statistics_set), plan.batch_size)]
    defense.fit_statistics(loader, progress=progress)
    fusion_data = patched_batches(fusion_set, patches, plan.batch_size, plan.eot, plan.seed + 1, placements=plan.placements,
                                  hard_negatives=plan.hard_negatives)
    history = defense.fit_fusion(fusion_data, plan.fusion, progress=progress)
    calibration_data = patched_batches(calibration_set, patches, plan.batch_size, plan.eot, plan.seed + 2, placements=plan.placements,
                                       hard_negatives=plan.hard_negatives)
    calibration = defense.calibrate(calibration_data, target_fpr=plan.target_fpr, progress=progress)
    report = {
        "statistics_images": len(statistics_set), "fusion_images": len(fusion_set), "calibration_images": len(calibration_set),
        "fusion_loss_first_last": [history[0], history[-1]], "threshold": calibration.threshold,
        "calibration": calibration.__dict__, "patches": len(patches), "placements": plan.placements,
        "target_fpr": plan.target_fpr, "hard_negatives": plan.hard_negatives,
    }
    logger.info("fitted Z-Mask: statistics on %d images, fusion block on %d (loss %.4f -> %.4f), lambda0 %.4f on %d",
                len(statistics_set), len(fusion_set), history[0], history[-1], calibration.threshold, len(calibration_set))
    return defense, report


def layer_separability(
    model: torch.nn.Module, layers: Sequence[str], config: ZMaskConfig, clean: Dataset, patched: list[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 8, progress: bool = True,
) -> dict[str, dict[str, float]]:
    from sklearn.metrics import roc_auc_score

    """Evidence for choosing S and D: per candidate layer, how well its own SPR heatmap separates
    clean from patched images (ROC AUC of the heatmap maximum) and how much brighter it is inside
    the patch than outside (ratio of means)."""
    defense = ZMask(model, config.replace(shallow_layers=tuple(layers), deep_layers=tuple(layers[:1])))
    loader = [torch.stack([clean[i]["image"] for i in range(s, min(s + batch_size, len(clean)))]) for s in range(0, len(clean), batch_size)]
    defense.fit_statistics(loader, progress=progress)
    refiner = LayerRefiner(defense.config)
    peaks: dict[str, dict[str, list[float]]] = {layer: {"clean": [], "patched": []} for layer in layers}
    contrast: dict[str, list[float]] = {layer: [] for layer in layers}
    sources = [("clean", images, None) for images in loader] + [("patched", images, masks) for images, masks in patched]
    for kind, images, masks in tqdm(sources, desc="layers", disable=not progress):
        with torch.no_grad(), ActivationCapture(model, layers) as capture:
            model(images)
            for layer in layers:
                heatmap = refiner.heatmaps(capture.activations[layer], defense.statistics[layer], {"S": config.shallow_kernels})["S"]
                peaks[layer][kind] += heatmap.flatten(1).amax(1).tolist()
                if masks is not None:
                    inside = resize_nearest(masks, tuple(heatmap.shape[-2:])) > 0.5
                    mean_in = (heatmap * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
                    mean_out = (heatmap * ~inside).flatten(1).sum(1) / (~inside).flatten(1).sum(1).clamp(min=1)
                    contrast[layer] += (mean_in / mean_out.clamp(min=1e-9)).tolist()
    table = {}
    for layer in layers:
        labels = [0] * len(peaks[layer]["clean"]) + [1] * len(peaks[layer]["patched"])
        table[layer] = {
            "auc": float(roc_auc_score(labels, peaks[layer]["clean"] + peaks[layer]["patched"])),
            "inside_outside_ratio": float(sum(contrast[layer]) / max(len(contrast[layer]), 1)),
        }
    return table
