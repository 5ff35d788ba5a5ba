"""The defended model: a network wrapped with Z-Mask analysis, gating and re-processing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ZMaskConfig
from .core.calibration import Calibration, calibrate_threshold
from .core.capture import ActivationCapture, RepeatPolicy, resolve_modules
from .core.fusion import FusionBlock, FusionTraining, detection_score, train_fusion
from .core.refinement import LayerRefiner
from .core.statistics import LayerStatistics, StatisticsAccumulator, resize_nearest
from .errors import NotFittedError
from .validation import batch_images, batch_images_and_masks, check_images, check_masks


@dataclass
class Heatmaps:
    """H_S and H_D (B x 1 x H_R x W_R), and on request each layer's own heatmap per set."""

    shallow: torch.Tensor
    deep: torch.Tensor
    per_layer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Detection:
    """What Z-Mask concludes about a batch.

    soft_mask: M~ (B x 1 x H_R x W_R); score: d (B); flagged: d > lambda0 (B, bool);
    keep_mask: Eq. 4 keep-mask at input resolution (B x 1 x H x W; 1 = keep, all ones if not flagged).
    """

    soft_mask: torch.Tensor
    score: torch.Tensor
    flagged: torch.Tensor
    keep_mask: torch.Tensor


@dataclass
class DefenseOutput:
    """The defended task output together with the detection that produced it."""

    output: Any
    detection: Detection
    heatmaps: Heatmaps | None = None


class ZMask(nn.Module):
    """A model defended by Z-Mask.

    Owns the model, the configuration, the clean statistics, the fusion block and the threshold
    lambda0. ``forward(x)`` runs the model once while reading the configured layers, scores the
    batch, and re-runs the model only on flagged images after masking the suspected patch.

    The model must accept a B x C x H x W float tensor (wrap detectors and preprocessing so that it
    does; see ``zmask.models``). Nothing here assumes a device: the defense runs where the model
    and the input are.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ZMaskConfig,
        statistics: dict[str, LayerStatistics] | None = None,
        fusion: FusionBlock | None = None,
        threshold: float | None = None,
        on_repeat: RepeatPolicy = "error",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, ZMaskConfig):
            raise TypeError(f"config must be a ZMaskConfig, got {type(config).__name__}")
        resolve_modules(model, config.layers)  # fail now on unknown layer names
        self.model = model
        self.config = config
        self.on_repeat = on_repeat
        self.fusion = fusion if fusion is not None else FusionBlock(torch.Generator().manual_seed(seed))
        self.statistics = statistics
        self.threshold = threshold
        self.calibration: Calibration | None = None
        self.fit_input_size: tuple[int, int] | None = None
        self._refiner = LayerRefiner(config)
        self._device_statistics: dict[str, dict[str, LayerStatistics]] = {}

    # ------------------------------------------------------------------ fitting
    def fit_statistics(self, data: Iterable[Any], max_images: int | None = None, progress: bool = False) -> ZMask:
        """Clean statistics mu, sigma of every configured layer from an iterable of clean batches.

        Batches are tensors, tuples whose first item is the image tensor, or dicts with 'image'.
        The model runs in eval mode without gradients; its previous mode is restored afterwards.
        Under ``torch.distributed`` give each rank its own shard (``zmask.distributed.shard``): the
        accumulators of all ranks are merged, so every rank ends with the same statistics.
        """
        config = self.config
        accumulator = StatisticsAccumulator(config.heatmap_size, config.planes, config.std_estimator)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in tqdm(data, desc="statistics", disable=not progress):
                    images = check_images(batch_images(batch), config.in_channels)
                    if max_images is not None:
                        images = images[: max(0, max_images - accumulator.images)]
                        if images.shape[0] == 0:
                            break
                    accumulator.update(self._activations(images)[1])
                    self.fit_input_size = tuple(images.shape[-2:])
        finally:
            self.model.train(was_training)
        accumulator.all_reduce()
        self.set_statistics(accumulator.compute())
        return self

    def set_statistics(self, statistics: dict[str, LayerStatistics]) -> None:
        """Install statistics (e.g. merged from several ranks), checking they cover every layer."""
        missing = [name for name in self.config.layers if name not in statistics]
        if missing:
            raise ValueError(f"statistics are missing layers {missing}")
        for name, stats in statistics.items():
            if stats.planes != self.config.planes:
                raise ValueError(f"statistics of layer {name!r} have {stats.planes} planes, the configuration {self.config.planes}")
        self.statistics = {name: statistics[name] for name in self.config.layers}
        self._device_statistics.clear()

    def fusion_targets(self, data: Iterable[Any], progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heatmaps (H_S, H_D) and patch masks at heatmap size for every image of ``data``.

        ``data`` yields (images, patch_masks) with masks at input resolution (all zero for clean
        images). The heatmaps are computed once without gradients, then reused across epochs.
        """
        shallow, deep, targets = [], [], []
        with torch.no_grad():
            for maps, masks in self._labelled_heatmaps(data, "heatmaps", progress):
                shallow.append(maps.shallow)
                deep.append(maps.deep)
                targets.append((resize_nearest(masks, self.config.heatmap_size) > 0.5).float())
        if not shallow:
            raise ValueError("no (image, patch mask) batches were given")
        return torch.cat(shallow), torch.cat(deep), torch.cat(targets)

    def _labelled_heatmaps(self, data: Iterable[Any], description: str, progress: bool):
        """(heatmaps, validated binary patch masks) for each (images, patch_masks) batch of ``data``."""
        for batch in tqdm(data, desc=description, disable=not progress):
            images, masks = batch_images_and_masks(batch)
            images = check_images(images, self.config.in_channels)
            yield self.heatmaps(images), check_masks(masks.to(images.device), images)

    def fit_fusion(self, data: Iterable[Any], settings: FusionTraining = FusionTraining(), progress: bool = False) -> list[float]:
        """Train the fusion block on (images, patch_masks) batches; returns the loss per epoch."""
        shallow, deep, targets = self.fusion_targets(data, progress)
        self.fusion.to(shallow.device)
        return train_fusion(self.fusion, shallow, deep, targets, settings, progress)

    def calibrate(self, data: Iterable[Any], target_fpr: float | None = None, progress: bool = False) -> Calibration:
        """Choose lambda0 by ROC over (images, patch_masks) batches: an image is positive if its mask is not empty."""
        scores, labels = [], []
        with torch.no_grad():
            for maps, masks in self._labelled_heatmaps(data, "calibration", progress):
                soft = self.fusion(maps.shallow, maps.deep)
                scores.append(detection_score(maps.shallow, maps.deep, soft, self.config.score).cpu())
                labels.append(masks.flatten(1).amax(1).cpu() > 0)
        if not scores:
            raise ValueError("no calibration batches were given")
        scores_all, labels_all = torch.cat(scores), torch.cat(labels)
        if labels_all.all() or not labels_all.any():
            raise ValueError("calibration needs both clean images (empty masks) and patched images")
        self.calibration = calibrate_threshold(scores_all[~labels_all], scores_all[labels_all], target_fpr)
        self.threshold = self.calibration.threshold
        return self.calibration

    # ------------------------------------------------------------------ analysis
    def _activations(self, images: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        with ActivationCapture(self.model, self.config.layers, self.on_repeat) as capture:
            output = self.model(images)
        activations = capture.require_all()
        for name, activation in activations.items():
            if activation.dim() != 4:
                raise ValueError(f"layer {name!r} gives a {activation.dim()}-D output of shape {tuple(activation.shape)}; choose a convolutional layer (B x C x H x W)")
        return output, activations

    def _statistics_on(self, device: torch.device) -> dict[str, LayerStatistics]:
        if self.statistics is None:
            raise NotFittedError("clean statistics are missing: call fit_statistics(...) or load a profile first")
        key = str(device)
        if key not in self._device_statistics:
            self._device_statistics[key] = {name: stats.to(device) for name, stats in self.statistics.items()}
        return self._device_statistics[key]

    def heatmaps_from_activations(self, activations: dict[str, torch.Tensor], per_layer: bool = False) -> Heatmaps:
        """H_S and H_D from captured activations (pixel-wise max over the layers of each set)."""
        config = self.config
        device = next(iter(activations.values())).device
        statistics = self._statistics_on(device)
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for name in config.layers:
            activation, stats = activations[name], statistics[name]
            if activation.shape[1] != stats.channels:
                raise ValueError(
                    f"layer {name!r} has {activation.shape[1]} channels but its statistics {stats.channels}: "
                    "the statistics or profile belong to another model"
                )
            kernel_sets = {}
            if name in config.shallow_layers:
                kernel_sets["S"] = config.shallow_kernels
            if name in config.deep_layers:
                kernel_sets["D"] = config.deep_kernels
            maps[name] = self._refiner.heatmaps(activation, stats, kernel_sets)
        shallow = torch.stack([maps[n]["S"] for n in config.shallow_layers]).amax(0)
        deep = torch.stack([maps[n]["D"] for n in config.deep_layers]).amax(0)
        return Heatmaps(shallow, deep, maps if per_layer else {})

    def heatmaps(self, images: torch.Tensor, per_layer: bool = False) -> Heatmaps:
        """H_S and H_D of a batch (one forward pass of the model)."""
        images = check_images(images, self.config.in_channels)
        return self.heatmaps_from_activations(self._activations(images)[1], per_layer)

    def _detect(self, heatmaps: Heatmaps, input_size: tuple[int, int], gate: bool) -> Detection:
        soft = self.fusion(heatmaps.shallow, heatmaps.deep)
        score = detection_score(heatmaps.shallow, heatmaps.deep, soft, self.config.score)
        if gate:
            if self.threshold is None:
                raise NotFittedError("the threshold lambda0 is not set: call calibrate(...) or pass gate=False")
            flagged = score > self.threshold
        else:
            flagged = torch.ones_like(score, dtype=torch.bool)
        masked = F.interpolate((soft > self.config.mask_threshold).float(), size=input_size, mode="nearest")
        if self.config.mask_dilation:
            width = 2 * self.config.mask_dilation + 1
            masked = F.max_pool2d(masked, width, stride=1, padding=self.config.mask_dilation)
        keep = torch.where(flagged.view(-1, 1, 1, 1), 1.0 - masked, torch.ones_like(masked))
        return Detection(soft, score, flagged, keep)

    def detect(self, images: torch.Tensor, gate: bool = True) -> Detection:
        """Score, flag and mask a batch without re-processing it."""
        maps = self.heatmaps(images)
        return self._detect(maps, tuple(images.shape[-2:]), gate)

    def apply_mask(self, images: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """x * M + fill * (1 - M), in the space the model consumes."""
        fill = torch.as_tensor(self.config.fill_value, dtype=images.dtype, device=images.device)
        fill = fill.view(1, -1, 1, 1) if fill.dim() else fill
        return images * keep_mask + fill * (1.0 - keep_mask)

    def forward(self, images: torch.Tensor, gate: bool = True, return_heatmaps: bool = False) -> DefenseOutput:
        """Defended inference; with ``gate=False`` every image is masked (the authors' demo)."""
        images = check_images(images, self.config.in_channels)
        output, activations = self._activations(images)
        maps = self.heatmaps_from_activations(activations)
        detection = self._detect(maps, tuple(images.shape[-2:]), gate)
        if detection.flagged.any():
            index = detection.flagged.nonzero().flatten()
            rerun = self.model(self.apply_mask(images[index], detection.keep_mask[index]))
            output = merge_outputs(output, rerun, index)
        return DefenseOutput(output, detection, maps if return_heatmaps else None)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the profile (configuration, statistics, fusion parameters, lambda0) to ``path``."""
        from .core.profile import save_profile

        return save_profile(self, path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, check_model: bool = True, **kwargs: Any) -> ZMask:
        """Rebuild a defense from a profile for ``model``; a mismatching model raises ``ProfileError``."""
        from .core.profile import load_profile

        return load_profile(path, model, cls, check_model=check_model, **kwargs)


def merge_outputs(first: Any, second: Any, index: torch.Tensor) -> Any:
    """Replace the entries ``index`` of a batched output by the re-processed ones.

    Handles tensors (batch first), lists of per-image results (torchvision detection), and
    tuples or dictionaries whose items are batched.
    """
    if isinstance(first, torch.Tensor):
        merged = first.clone()
        merged[index] = second.to(merged.dtype)
        return merged
    if isinstance(first, dict):
        return {key: merge_outputs(value, second[key], index) for key, value in first.items()}
    if isinstance(first, tuple):
        return tuple(merge_outputs(a, b, index) for a, b in zip(first, second))
    if isinstance(first, list):
        merged_list = list(first)
        for position, item in zip(index.tolist(), second):
            merged_list[position] = item
        return merged_list
    raise TypeError(f"cannot merge model outputs of type {type(first).__name__}; return a tensor, list or dict")
