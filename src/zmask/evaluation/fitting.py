"""Fitting Z-Mask on a real model end to end, and the per-layer evidence for choosing S and D."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..attacks import EOTConfig, apply_patch
from ..config import MAX_CANDIDATE_WINDOWS, ZMaskConfig
from ..core.fusion import FusionTraining
from ..data.batching import dataset_length, image_batches
from ..defense import ZMask
from ..errors import ConfigError
from .cost import CostChoice, choose_heatmap
from .layer_selection import layer_evidence, select_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitPlan:
    """How the training split is divided: statistics images, fusion images, calibration images.
    ``placements``: how many times each fusion / calibration image is drawn (clean or with a patch
    at a fresh random place); above 1 it stretches a small training split. ``target_fpr``: choose
    lambda0 for at most this false-positive rate on the clean calibration images (None: Youden's J).
    ``hard_negatives``: share of the clean fusion and calibration samples that carry a harmless
    occluder (noise or a crop of another image) labelled "no patch" (:func:`patched_batches`);
    ``target_fpr`` then bounds the false alarms on plain and on occluded clean images each.
    ``auto_layers``: choose S and D first (:func:`~zmask.evaluation.layer_selection.select_layers`)
    among ``layer_candidates`` (None: the model's modules down to 1/8 resolution), with statistics
    on up to ``selection_images`` statistics images and the evidence on as many fusion images,
    clean and patched.
    ``calibrate_mask``: beyond the paper, choose the soft-mask threshold of Eq. 4 (0.5 in the paper)
    for the best patch-mask IoU on the patched calibration samples (:meth:`ZMask.calibrate`);
    either way the fit reports that IoU and warns when the masks come out (nearly) empty.
    ``max_overhead``: choose the heatmap grid (among ``heatmap_candidates``, default the configured
    grid and its halvings) whose defended clean frame costs at most ``1 + max_overhead`` forward
    passes on this machine (:func:`~zmask.evaluation.cost.choose_heatmap`), after the layers are
    chosen; the report's ``cost`` gives the measured grids and the layer evidence at the configured
    and the chosen grid.
    ``layered``: beyond the paper, layered evidence - the channel-extreme score of every analysed
    layer joins the Z-Mask score in one flag whose thresholds are calibrated together, and a
    flagged frame's keep-mask is chosen among candidates (Eq. 4's, coverage regions, windows of
    the patches' sizes) by re-running each (``ZMaskConfig.mask_candidates``), by the rule
    ``candidate_choice`` (``ZMaskConfig.candidate_choice``).
    ``headroom``: instead of ROC, each threshold sits just above the clean calibration scores
    (:func:`~zmask.core.calibration.clean_anchored_threshold`), so that an adaptive attack has to
    bring its scores into the clean range, not only under the gap to the fitting patches."""

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
    auto_layers: bool = False
    layer_candidates: tuple[str, ...] | None = None
    selection_images: int = 40
    calibrate_mask: bool = False
    max_overhead: float | None = None
    heatmap_candidates: tuple[tuple[int, int], ...] = ()
    layered: bool = False
    candidate_choice: str = "clearance"
    headroom: float | None = None


def training_shares(dataset: Dataset, plan: FitPlan) -> tuple[Subset, Subset, Subset]:
    """The statistics, fusion and calibration shares of a training split (seeded by ``plan.seed``)."""
    order = torch.randperm(dataset_length(dataset), generator=torch.Generator().manual_seed(plan.seed)).tolist()
    first = plan.statistics_images
    second = first + plan.fusion_images
    third = second + plan.calibration_images
    return Subset(dataset, order[:first]), Subset(dataset, order[first:second]), Subset(dataset, order[second:third])


def patched_batches(dataset: Dataset, patches: Sequence[torch.Tensor], batch_size: int, eot: EOTConfig, seed: int, clean_share: float = 0.5,
                    placements: int = 1, hard_negatives: float = 0.0, mark_occluders: bool = False):
    """(images, masks) batches: each image gets a random patch of ``patches`` at a random place, or
    stays clean (empty mask) with probability ``clean_share``; the dataset is gone through
    ``placements`` times with fresh draws. Deterministic for a seed.

    ``hard_negatives``: the share of the clean samples that get a harmless occluder of a patch's
    size - uniform random noise, or a crop of another image of ``dataset`` (half each) - and
    still an empty mask, so that a flag learnt or calibrated on them means "adversarial patch"
    rather than "something unusual is in the picture". 0 is the paper's training.
    ``mark_occluders``: (images, masks, occluded) batches, ``occluded`` marking those samples, so
    that calibration bounds their false alarms on their own (:meth:`ZMask.calibrate`). The images
    and masks are the same either way.
    """
    if placements < 1:
        raise ConfigError(f"placements={placements} must be at least 1")
    if not 0.0 <= hard_negatives <= 1.0:
        raise ConfigError(f"hard_negatives={hard_negatives} must lie in [0, 1]")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    length = dataset_length(dataset)
    order = [index for _ in range(placements) for index in range(length)]
    for start in range(0, len(order), batch_size):
        images, masks, occluded = [], [], []
        for index in order[start : start + batch_size]:
            image = dataset[index]["image"]
            occluded.append(False)
            if float(torch.rand((), generator=generator)) < clean_share:
                if hard_negatives and float(torch.rand((), generator=generator)) < hard_negatives:
                    occluded[-1] = True
                    shape = patches[int(torch.randint(0, len(patches), (), generator=generator))].shape
                    size = (int(shape[-2]), int(shape[-1]))
                    occluder = _occluder(dataset, index, image.shape[0], size, generator)
                    # Placed as it is: resampling by the EOT's scale would smooth the noise into
                    # something tamer than noise at its own size (it scored 0.09-0.17 against
                    # 0.21 unscaled on YOLOv5n), and the threshold would be set below the latter.
                    image = apply_patch(image[None], occluder, generator, EOTConfig.none()).images[0]
                images.append(image)
                masks.append(torch.zeros(1, *image.shape[-2:]))
                continue
            patch = patches[int(torch.randint(0, len(patches), (), generator=generator))]
            placed = apply_patch(image[None], patch, generator, eot)
            images.append(placed.images[0])
            masks.append(placed.masks[0])
        batch = (torch.stack(images), torch.stack(masks))
        batches.append((*batch, torch.tensor(occluded)) if mark_occluders else batch)
    return batches


def _occluder(dataset: Dataset, index: int, channels: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A harmless occluder of ``size``: uniform 8-bit noise, or a crop of another image of the dataset."""
    if float(torch.rand((), generator=generator)) < 0.5 or dataset_length(dataset) < 2:
        return torch.randint(0, 256, (channels, *size), generator=generator).float() / 255
    length = dataset_length(dataset)
    other = dataset[(index + 1 + int(torch.randint(0, length - 1, (), generator=generator))) % length]["image"]
    height, width = min(size[0], other.shape[-2]), min(size[1], other.shape[-1])
    top = int(torch.randint(0, other.shape[-2] - height + 1, (), generator=generator))
    left = int(torch.randint(0, other.shape[-1] - width + 1, (), generator=generator))
    return other[:, top : top + height, left : left + width].clone()


def fit_zmask(model: torch.nn.Module, config: ZMaskConfig, dataset: Dataset, patches: Sequence[torch.Tensor],
              plan: FitPlan = FitPlan(), progress: bool = True) -> tuple[ZMask, dict[str, Any]]:
    """Statistics on clean training images, fusion on patched ones, lambda0 by ROC on a third share."""
    statistics_set, fusion_set, calibration_set = training_shares(dataset, plan)
    selection = None
    if plan.auto_layers:
        # Statistics on statistics images; the evidence on fusion images, clean and patched (paired).
        count = min(plan.selection_images, len(statistics_set), len(fusion_set))
        held_out = Subset(fusion_set, range(count))
        patched = patched_batches(held_out, patches, plan.batch_size, plan.eot, plan.seed + 3, clean_share=0.0)
        selection = select_layers(model, config, Subset(statistics_set, range(count)), held_out, patched, plan.layer_candidates,
                                  batch_size=plan.batch_size, progress=progress)
        config = config.replace(shallow_layers=selection.shallow, deep_layers=selection.deep)
        logger.info("chose S = %s and D = %s among %d candidate layers", selection.shallow, selection.deep, len(selection.evidence))
    cost = None
    if plan.max_overhead is not None:
        cost = _cost_aware_grid(model, config, statistics_set, fusion_set, patches, plan, progress)
        config = config.at_heatmap(cost.chosen)
    if plan.layered:
        windows = tuple(dict.fromkeys((int(p.shape[-2]), int(p.shape[-1])) for p in patches))[:MAX_CANDIDATE_WINDOWS]
        config = config.replace(extreme_layers=config.layers, mask_candidates=True, candidate_windows=windows,
                                candidate_choice=plan.candidate_choice)
    defense = ZMask(model, config, seed=plan.seed)
    defense.fit_statistics(image_batches(statistics_set, plan.batch_size), progress=progress)
    fusion_data = patched_batches(fusion_set, patches, plan.batch_size, plan.eot, plan.seed + 1, placements=plan.placements,
                                  hard_negatives=plan.hard_negatives)
    history = defense.fit_fusion(fusion_data, plan.fusion, progress=progress)
    calibration_data = patched_batches(calibration_set, patches, plan.batch_size, plan.eot, plan.seed + 2, placements=plan.placements,
                                       hard_negatives=plan.hard_negatives, mark_occluders=True)
    calibration = defense.calibrate(calibration_data, target_fpr=plan.target_fpr, progress=progress, calibrate_mask=plan.calibrate_mask,
                                    headroom=plan.headroom)
    report = {
        "statistics_images": len(statistics_set), "fusion_images": len(fusion_set), "calibration_images": len(calibration_set),
        "fusion_loss_first_last": [history[0], history[-1]], "threshold": calibration.threshold,
        "calibration": calibration.__dict__, "patches": len(patches), "placements": plan.placements,
        "target_fpr": plan.target_fpr, "headroom": plan.headroom, "hard_negatives": plan.hard_negatives,
        "mask_threshold": defense.config.mask_threshold, "calibrate_mask": plan.calibrate_mask,
        "calibration_mask_iou": defense.state.calibration_mask_iou,
        "shallow_layers": list(config.shallow_layers), "deep_layers": list(config.deep_layers),
        "heatmap_size": list(config.heatmap_size), "layered": plan.layered,
        "candidate_choice": config.candidate_choice,
    }
    if defense.state.extreme_calibration is not None:
        report["extreme_calibration"] = defense.state.extreme_calibration.__dict__
    if selection is not None:
        report["layer_selection"] = selection.to_dict()
    if cost is not None:
        report["cost"] = cost.to_dict()
    defense.state.provenance = {"fit": report}
    logger.info("fitted Z-Mask: statistics on %d images, fusion block on %d (loss %.4f -> %.4f), lambda0 %.4f on %d",
                len(statistics_set), len(fusion_set), history[0], history[-1], calibration.threshold, len(calibration_set))
    return defense, report


def _cost_aware_grid(model: torch.nn.Module, config: ZMaskConfig, statistics_set: Dataset, fusion_set: Dataset,
                     patches: Sequence[torch.Tensor], plan: FitPlan, progress: bool) -> CostChoice:
    """The heatmap grid within ``plan.max_overhead`` (timed on the first statistics image), with the
    layers' evidence (held-out fusion images, clean and patched) at the configured and the chosen grid."""
    probe = statistics_set[0]["image"][None]
    cost = choose_heatmap(model, config, probe, float(plan.max_overhead or 0), plan.heatmap_candidates or None)
    count = min(plan.selection_images, dataset_length(statistics_set), dataset_length(fusion_set))
    held_out = Subset(fusion_set, range(count))
    patched = patched_batches(held_out, patches, plan.batch_size, plan.eot, plan.seed + 3, clean_share=0.0)
    for grid in dict.fromkeys([config.heatmap_size, cost.chosen]):
        evidence = layer_evidence(model, config.layers, config.at_heatmap(grid), Subset(statistics_set, range(count)), held_out, patched,
                                  plan.batch_size, progress=progress)
        for item in evidence:
            cost.evidence.setdefault(item.layer, {})[f"{grid[0]}x{grid[1]}"] = {"auc": item.auc, "localisation": item.localisation}
    return cost
