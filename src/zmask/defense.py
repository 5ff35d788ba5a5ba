"""The defended model: a network wrapped with Z-Mask analysis, gating and re-processing."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ZMaskConfig
from .core.analysis import Analysis, Heatmaps, analyze
from .core.calibration import Calibration, calibrate_threshold, calibrate_union
from .core.candidates import Trial, better_candidate, candidate_keep_masks, search_windows
from .core.capture import ActivationCapture, RepeatPolicy, resolve_modules, run_and_capture
from .core.effect import output_change
from .core.extremes import ExtremeAccumulator
from .core.fusion import FusionBlock, FusionTraining, train_fusion
from .core.masking import apply_mask, choose_mask_threshold, mask_iou, patch_mask
from .core.profile import Profile, check_model_fits, check_weights, load_profile, save_profile, weights_fingerprints
from .core.refinement import LayerRefiner
from .core.state import FittedState
from .core.statistics import LayerStatistics, StatisticsAccumulator, resize_nearest
from .errors import ConfigError, InputError, NotFittedError, ProfileError, ZMaskTypeError
from .validation import batch_images, batch_images_and_masks, batch_occluded, check_images, check_masks, model_dtype

logger = logging.getLogger(__name__)

Detection = Analysis  # the name of earlier releases

@dataclass
class DefenseOutput:
    """The defended task output together with the analysis that produced it (``detection``)."""

    output: Any
    detection: Analysis
    heatmaps: Heatmaps | None = None


class ZMask(nn.Module):
    """A model defended by Z-Mask.

    Owns the model, the configuration and the fitted state (:class:`~zmask.core.state.FittedState`:
    clean statistics, fusion block, lambda0 and the rest, ``defense.state``). ``forward(x)`` runs
    the model once while reading the configured layers, scores the batch, and re-runs the model
    only on flagged images after masking the suspected patch; ``detect(x)`` gives the analysis
    alone. ``capture`` and ``analyze`` are the lower-level halves of both.

    The model must accept a B x C x H x W float tensor (wrap detectors and preprocessing so that it
    does; see ``zmask.models``). Nothing here assumes a device: the defense runs where the model
    and the input are.
    """

    model: nn.Module
    state: FittedState

    def __init__(
        self,
        model: nn.Module,
        config: ZMaskConfig,
        state: FittedState | None = None,
        on_repeat: RepeatPolicy = "error",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ZMaskTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, ZMaskConfig):
            raise ZMaskTypeError(f"config must be a ZMaskConfig, got {type(config).__name__}")
        if state is not None and not isinstance(state, FittedState):
            raise ZMaskTypeError(f"state must be a FittedState, got {type(state).__name__}")
        resolve_modules(model, config.layers)  # fail now on unknown layer names
        self.model = model
        self.config = config
        self.on_repeat = on_repeat
        self.state = state if state is not None else FittedState(fusion=FusionBlock(torch.Generator().manual_seed(seed)))
        self._refiner = LayerRefiner(config)
        self._clone_activations = False  # set once a forward pass is seen to change a read layer in place
        self._capture: tuple[tuple, ActivationCapture] | None = None

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
        maxima = ExtremeAccumulator()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in tqdm(data, desc="statistics", disable=not progress):
                    images = check_images(batch_images(batch), config.in_channels, dtype=model_dtype(self.model))
                    if max_images is not None:
                        images = images[: max(0, max_images - accumulator.images)]
                        if images.shape[0] == 0:
                            break
                    activations = self.capture(images)[1]
                    accumulator.update(activations)
                    if config.extreme_layers:
                        maxima.update({name: activations[name] for name in config.extreme_layers})
                    self.state.input_size = (int(images.shape[-2]), int(images.shape[-1]))
        finally:
            self.model.train(was_training)
        accumulator.all_reduce()
        self.set_statistics(accumulator.compute())
        if config.extreme_layers:
            maxima.all_reduce()
            self.state.extremes = maxima.compute()
        return self

    def set_statistics(self, statistics: dict[str, LayerStatistics]) -> None:
        """Install statistics (e.g. merged from several ranks), checking they cover every layer."""
        missing = [name for name in self.config.layers if name not in statistics]
        if missing:
            raise ConfigError(f"statistics are missing layers {missing}")
        for name, stats in statistics.items():
            if stats.planes != self.config.planes:
                raise ConfigError(f"statistics of layer {name!r} have {stats.planes} planes, the configuration {self.config.planes}")
        self.state.statistics = {name: statistics[name] for name in self.config.layers}

    def fusion_targets(self, data: Iterable[Any], progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heatmaps (H_S, H_D) and patch masks at heatmap size for every image of ``data``.

        ``data`` yields (images, patch_masks) with masks at input resolution (all zero for clean
        images). The heatmaps are computed once without gradients, then reused across epochs.
        """
        shallow, deep, targets = [], [], []
        with torch.no_grad():
            for analysis, masks, _ in self._labelled_analyses(data, "heatmaps", progress):
                shallow.append(analysis.heatmaps.shallow)
                deep.append(analysis.heatmaps.deep)
                targets.append((resize_nearest(masks, self.config.heatmap_size) > 0.5).float())
        if not shallow:
            raise InputError("no (image, patch mask) batches were given")
        return torch.cat(shallow), torch.cat(deep), torch.cat(targets)

    def _labelled_analyses(self, data: Iterable[Any], description: str, progress: bool):
        """(ungated analysis, validated binary patch masks, occluded flags or None) for each
        (images, patch_masks[, occluded]) batch of ``data``."""
        for batch in tqdm(data, desc=description, disable=not progress):
            images, masks = batch_images_and_masks(batch)
            images = check_images(images, self.config.in_channels, dtype=model_dtype(self.model))
            masks = check_masks(masks.to(images.device), images)
            occluded = batch_occluded(batch, masks)
            yield self.analyze(self.capture(images)[1], (int(images.shape[-2]), int(images.shape[-1])), gate=False), masks, occluded

    def fit_fusion(self, data: Iterable[Any], settings: FusionTraining = FusionTraining(), progress: bool = False) -> list[float]:
        """Train the fusion block on (images, patch_masks) batches; returns the loss per epoch."""
        shallow, deep, targets = self.fusion_targets(data, progress)
        self.state.fusion.to(shallow.device)
        return train_fusion(self.state.fusion, shallow, deep, targets, settings, progress)

    def calibrate(self, data: Iterable[Any], target_fpr: float | None = None, progress: bool = False,
                  calibrate_mask: bool = False, headroom: float | None = None) -> Calibration:
        """Choose lambda0 by ROC over (images, patch_masks) batches: an image is positive if its mask is not empty.

        Batches may carry a third item (or a dict's 'occluded'): which clean images carry a
        harmless occluder. ``target_fpr`` then bounds the false-alarm rate of plain and of occluded
        clean images each (:func:`~zmask.core.calibration.calibrate_threshold`'s negative kinds).
        ``headroom`` instead of an ROC criterion: each threshold sits just above the clean scores
        (:func:`~zmask.core.calibration.clean_anchored_threshold`), whatever the patches score.
        The same pass measures the patch-mask IoU on the patched images (``state.calibration_mask_iou``;
        a warning when it is near zero) and, with ``calibrate_mask``, first sets the soft-mask
        threshold of Eq. 4 to the one with the best IoU there (:func:`choose_mask_threshold`)."""
        scores, labels, occluders, hyper, soft, truth = [], [], [], [], [], []
        marked = False
        with torch.no_grad():
            for analysis, masks, occluded in self._labelled_analyses(data, "calibration", progress):
                patched = masks.flatten(1).amax(1) > 0
                scores.append(analysis.score.cpu())
                labels.append(patched.cpu())
                marked |= occluded is not None
                occluders.append((occluded if occluded is not None else torch.zeros_like(patched)).cpu())
                if analysis.extreme_score is not None:
                    hyper.append(analysis.extreme_score.cpu())
                if patched.any():
                    soft.append(analysis.soft_mask[patched].cpu())
                    truth.append(masks[patched].cpu() > 0.5)
        if not scores:
            raise InputError("no calibration batches were given")
        scores_all, labels_all = torch.cat(scores), torch.cat(labels)
        if labels_all.all() or not labels_all.any():
            raise InputError("calibration needs both clean images (empty masks) and patched images")
        state = self.state
        clean, patched = scores_all[~labels_all], scores_all[labels_all]
        kinds = torch.cat(occluders)[~labels_all].long() if marked else None
        if hyper:
            # Two kinds of evidence raise one flag: their thresholds are chosen together, so that
            # target_fpr (or Youden's J) is the false-alarm rate of the combination.
            hyper_all = torch.cat(hyper)
            state.calibration, alone, state.extreme_calibration = calibrate_union(
                clean, patched, hyper_all[~labels_all], hyper_all[labels_all], target_fpr, self.config.extreme_fpr, kinds, headroom)
            state.threshold, state.extreme_threshold = state.calibration.threshold, state.extreme_calibration.threshold
            logger.info("calibrated lambda0 %.4f (alone: TPR %.3f, FPR %.3f) and the extreme-score threshold %.4f (alone: TPR %.3f, "
                        "FPR %.3f) together: TPR %.3f, FPR %.3f", state.threshold, alone.true_positive_rate, alone.false_positive_rate,
                        state.extreme_threshold, state.extreme_calibration.true_positive_rate,
                        state.extreme_calibration.false_positive_rate, state.calibration.true_positive_rate,
                        state.calibration.false_positive_rate)
        else:
            state.calibration = calibrate_threshold(clean, patched, target_fpr, kinds, headroom)
            state.threshold = state.calibration.threshold
        logger.info("calibrated lambda0 = %.4f on %d clean images (%d with a harmless occluder) and %d patched images (AUC %.3f)",
                    state.threshold, int((~labels_all).sum()), int(kinds.sum()) if kinds is not None else 0, int(labels_all.sum()),
                    state.calibration.auc)
        self._calibrate_mask(torch.cat(soft), torch.cat(truth), calibrate_mask)
        return state.calibration

    def _calibrate_mask(self, soft_masks: torch.Tensor, true_masks: torch.Tensor, choose: bool) -> None:
        if choose:
            self.config = self.config.replace(mask_threshold=choose_mask_threshold(soft_masks, true_masks)[0])
        threshold = self.config.mask_threshold
        size = (int(true_masks.shape[-2]), int(true_masks.shape[-1]))
        iou = self.state.calibration_mask_iou = float(mask_iou(patch_mask(soft_masks, size, threshold), true_masks).mean())
        if iou < 0.05:
            logger.warning("the patch masks are (nearly) empty on the patched calibration images (mean IoU %.3f at soft-mask "
                           "threshold %.2f; highest soft-mask value %.3f): flagged images would be re-processed unmasked. "
                           "Calibrate with calibrate_mask=True (zmask fit --calibrate-mask) or train the fusion block longer",
                           iou, threshold, float(soft_masks.max()))

    # ------------------------------------------------------------------ analysis
    def capture(self, images: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        """(model output, activations of every configured layer) of one forward pass.

        Without gradients the layer outputs are read in place, not copied, until a forward pass
        shows that the model changes one of them in place (an in-place ReLU after it, say); that
        pass is redone with copies, and copies are taken from then on.
        """
        if self._clone_activations or torch.is_grad_enabled():
            return run_and_capture(self.model, images, self.config.layers, self.on_repeat)
        key = (tuple(self.config.layers), self.on_repeat)
        if self._capture is None or self._capture[0] != key:  # resolving the layers walks every module: once, not per frame
            self._capture = (key, ActivationCapture(self.model, self.config.layers, self.on_repeat, clone=False))
        with self._capture[1] as capture:
            output = self.model(images)
        modified = capture.modified()
        if modified:
            logger.info("the model changes layers %s in place after they are read: copying layer outputs from now on", modified)
            self._clone_activations = True
            return run_and_capture(self.model, images, self.config.layers, self.on_repeat)
        return output, capture.require_all()

    def analyze(self, activations: dict[str, torch.Tensor], input_size: tuple[int, int], gate: bool = True,
                per_layer: bool = False) -> Analysis:
        """Lower level: the Z-Mask analysis of activations from :meth:`capture` (see
        :func:`zmask.core.analysis.analyze`) for images of ``input_size``."""
        if not activations:
            raise InputError("no activations were given")
        return analyze(activations, self.state, self.config, self._refiner, input_size, gate, per_layer)

    def detect(self, images: torch.Tensor, gate: bool = True, per_layer: bool = False) -> Analysis:
        """What Z-Mask concludes about a batch, without re-processing it: heatmaps (each layer's too
        with ``per_layer``), soft mask, score, flag, patch and keep masks (:class:`Analysis`).
        ``gate=False`` flags (and masks) every image; it needs no lambda0."""
        images = check_images(images, self.config.in_channels, dtype=model_dtype(self.model))
        return self.analyze(self.capture(images)[1], (int(images.shape[-2]), int(images.shape[-1])), gate, per_layer)

    def apply_mask(self, images: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """x * M + fill * (1 - M), in the space (and dtype) the model consumes."""
        return apply_mask(images, keep_mask, self.config.fill_value)

    def forward(self, images: torch.Tensor, gate: bool = True, return_heatmaps: bool = False) -> DefenseOutput:
        """Defended inference; with ``gate=False`` every image is masked (the authors' demo)."""
        images = check_images(images, self.config.in_channels, dtype=model_dtype(self.model))
        output, activations = self.capture(images)
        analysis = self.analyze(activations, (int(images.shape[-2]), int(images.shape[-1])), gate)
        if analysis.flagged.any():
            index = analysis.flagged.nonzero().flatten()
            if self.config.mask_candidates:
                rerun = self._best_candidates(images, output, analysis, index)
            else:
                rerun = self.model(self.apply_mask(images[index], analysis.keep_mask[index]))
            output = merge_outputs(output, rerun, index)
        return DefenseOutput(output, analysis, analysis.heatmaps if return_heatmaps else None)

    def _best_candidates(self, images: torch.Tensor, output: Any, analysis: Analysis, index: torch.Tensor) -> Any:
        """Evidence-guided masking: re-run the flagged images ``index`` once per candidate keep-mask
        (:func:`~zmask.core.candidates.candidate_keep_masks`; with the "effect" rule also the
        evidence-free windows of :func:`~zmask.core.candidates.search_windows`), in batches no
        larger than the input batch, keep for each image the candidate
        :func:`~zmask.core.candidates.better_candidate` prefers under ``config.candidate_choice``,
        and return those re-passes' outputs. The "effect" rule measures each re-pass against
        ``output`` (the first pass). Sets ``analysis.keep_mask``, ``patch_mask`` (the chosen box
        where a box won) and ``candidate``."""
        if self.state.threshold is None or analysis.margin is None:
            raise NotFittedError("choosing among keep-mask candidates needs lambda0: calibrate the defense first")
        config, keep = self.config, analysis.keep_mask
        size = (int(images.shape[-2]), int(images.shape[-1]))
        by_effect = config.candidate_choice == "effect"
        searched = search_windows(config.candidate_windows, size) if by_effect else []
        per_image = [candidate_keep_masks(analysis, keep, int(i), config.candidate_windows, config.candidate_regions, searched)
                     for i in index.tolist()]
        before = take_outputs(output, index) if by_effect else None
        first_margins = analysis.margin[index].tolist()
        largest_area = max((h * w for h, w in config.candidate_windows), default=0)
        best: list[Trial | None] = [None] * len(per_image)
        best_position = [0] * len(per_image)
        best_output: list[Any] = [None] * len(per_image)
        for slot, position, trial, rerun in self._rerun(images, index, before, per_image):
            if by_effect:  # may win on its effect only if it removed some evidence and hides at most twice the largest patch
                trial = trial._replace(eligible=trial.margin < first_margins[slot] and trial.area <= 2 * largest_area)
            incumbent = best[slot]
            if incumbent is None or better_candidate(trial, incumbent, config.candidate_choice):  # ties keep the earlier one
                best[slot], best_position[slot], best_output[slot] = trial, position, rerun
        stacked = torch.cat(per_image)
        positions = torch.tensor(best_position, dtype=torch.long, device=stacked.device)
        first = torch.tensor([0] + [len(c) for c in per_image[:-1]], device=stacked.device).cumsum(0)
        candidate = torch.full(analysis.flagged.shape, -1, dtype=torch.long, device=keep.device)
        candidate[index] = (positions - first).to(keep.device)
        updated_keep, updated_patch = keep.clone(), analysis.patch_mask.clone()
        updated_keep[index] = stacked[positions]
        boxes = candidate[index] > 0
        updated_patch[index[boxes]] = 1.0 - stacked[positions[boxes.to(positions.device)]]
        analysis.keep_mask, analysis.patch_mask, analysis.candidate = updated_keep, updated_patch, candidate
        return concat_outputs(best_output)

    def _rerun(self, images: torch.Tensor, index: torch.Tensor, before: Any,
               per_image: list[torch.Tensor]) -> Iterator[tuple[int, int, Trial, Any]]:
        """Re-run image ``index[slot]`` masked by each of ``per_image[slot]`` (K_slot x 1 x H x W),
        in batches of the input batch's size (peak memory as for the input, whatever the number of
        candidates); yields (slot, position among all candidates, :class:`Trial`, that re-pass's
        output). The trial's change is measured against ``before`` (the first pass's outputs of
        ``index``) when given, else 0."""
        owners = [slot for slot, candidates in enumerate(per_image) for _ in range(len(candidates))]
        stacked = torch.cat(per_image)
        areas = (1.0 - stacked).flatten(1).sum(1).tolist()
        size = (int(images.shape[-2]), int(images.shape[-1]))
        step = max(1, int(images.shape[0]))
        for start in range(0, len(owners), step):
            part = list(range(start, min(start + step, len(owners))))
            slots = torch.tensor([owners[p] for p in part], dtype=torch.long, device=index.device)
            masks = stacked[torch.tensor(part, device=stacked.device)]
            rerun, activations = self.capture(self.apply_mask(images[index[slots]], masks))
            margins = self.analyze(activations, size, gate=False).margin
            assert margins is not None  # lambda0 is set
            changes = output_change(take_outputs(before, slots), rerun, masks).tolist() if before is not None else [0.0] * len(part)
            for offset, (position, margin) in enumerate(zip(part, margins.tolist())):
                trial = Trial(float(margin), areas[position], float(changes[offset]))
                yield owners[position], position, trial, take_outputs(rerun, torch.tensor([offset], device=slots.device))

    # ------------------------------------------------------------------ persistence
    def profile(self) -> Profile:
        """The configuration and fitted state, with the model's fingerprint, as a :class:`~zmask.core.profile.Profile`."""
        if self.state.statistics is None:
            raise ProfileError("nothing to save: the defense has no statistics yet (call fit_statistics first)")
        return Profile(self.config, self.state, type(self.model).__name__, weights_fingerprints(self.model))

    def save(self, path: str | Path) -> Path:
        """Write the profile (configuration, statistics, fusion parameters, lambda0, a fingerprint of
        the model's weights) to ``path``."""
        return save_profile(self.profile(), path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, check_model: bool = True, allow_other_weights: bool = False,
             **kwargs: Any) -> ZMask:
        """Rebuild a defense from a profile for ``model``; a mismatching model raises ``ProfileError``.

        ``check_model``: run one blank image through ``model`` to compare layer channel counts,
        and compare the model's weights with the fingerprint the profile records (a profile fitted
        on other weights of the same architecture is refused unless ``allow_other_weights``).
        """
        profile = load_profile(path)
        if check_model:
            check_model_fits(profile, model, path, kwargs.get("on_repeat", "error"))
            check_weights(profile, model, path, allow_other_weights)
        else:
            try:
                resolve_modules(model, profile.config.layers)
            except ValueError as error:
                raise ProfileError(f"profile {path} does not fit this model: {error}") from None
        return cls(model, profile.config, profile.state, **kwargs)

    @classmethod
    def from_preset(cls, preset: Any, pretrained: bool = True, **kwargs: Any) -> ZMask:
        """The preset's model (``preset.build(pretrained)``) defended with the profile shipped for it
        (``preset.profile()``, SHA-256 checked). ``preset``: a :class:`~zmask.models.ModelPreset`
        or the name of a registered one; ``kwargs`` go to :meth:`load`."""
        if isinstance(preset, str):
            from .models import get_preset

            preset = get_preset(preset)
        path = preset.profile()
        logger.info("loading the shipped profile %s for preset %s", path, preset.name)
        return cls.load(path, preset.build(pretrained), **kwargs)


def take_outputs(output: Any, index: torch.Tensor) -> Any:
    """The entries ``index`` of a batched output (tensors batch first, lists of per-image results,
    tuples or dictionaries of those), in that order."""
    if isinstance(output, torch.Tensor):
        return output[index]
    if isinstance(output, dict):
        return {key: take_outputs(value, index) for key, value in output.items()}
    if isinstance(output, tuple):
        return tuple(take_outputs(value, index) for value in output)
    if isinstance(output, list):
        return [output[i] for i in index.tolist()]
    raise ZMaskTypeError(f"cannot select from model outputs of type {type(output).__name__}; return a tensor, list or dict")


def concat_outputs(outputs: list[Any]) -> Any:
    """Batched outputs (as :func:`take_outputs` gives them) joined along the batch, in order."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        return {key: concat_outputs([output[key] for output in outputs]) for key in first}
    if isinstance(first, tuple):
        return tuple(concat_outputs(list(parts)) for parts in zip(*outputs))
    if isinstance(first, list):
        return [item for output in outputs for item in output]
    raise ZMaskTypeError(f"cannot join model outputs of type {type(first).__name__}; return a tensor, list or dict")


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
    raise ZMaskTypeError(f"cannot merge model outputs of type {type(first).__name__}; return a tensor, list or dict")
