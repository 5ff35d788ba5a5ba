"""The Z-Mask analysis of one forward pass: heatmaps, soft mask, score, flag and keep-mask.

:func:`analyze` is the one path from captured activations to a decision. The defended forward
pass, ``detect``, calibration, fusion training, the activation- and defense-aware attacks and the
evaluation defenses all go through it (via :meth:`zmask.ZMask.analyze`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..config import ZMaskConfig
from ..errors import InputError, NotFittedError
from .calibration import union_score
from .extremes import coverage_map, extreme_score
from .fusion import fuse_and_score
from .masking import keep_mask, patch_mask
from .refinement import LayerRefiner
from .state import FittedState
from .statistics import LayerStatistics


@dataclass
class Heatmaps:
    """H_S and H_D (B x 1 x H_R x W_R), and on request each layer's own heatmap per set ("S", "D")."""

    shallow: torch.Tensor
    deep: torch.Tensor
    per_layer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Analysis:
    """What Z-Mask concludes about a batch.

    heatmaps: H_S, H_D; soft_mask: M~ (B x 1 x H_R x W_R, differentiable); score: d (B,
    differentiable); flagged: d > lambda0 (B bool; all True with gating off). The masks at input
    size are computed on first use only, so a clean frame never pays for them:
    ``patch_mask``: 1[M~ > threshold] (B x 1 x H x W, 1 = patch, every image, not dilated);
    ``keep_mask``: Eq. 4's M (1 = keep; all ones where not flagged; dilated by ``mask_dilation``).
    With channel-extreme evidence (``config.extreme_layers``): ``extreme_score`` (B), and an image
    is flagged by either score; with ``config.extreme_mask`` or ``config.mask_candidates`` also
    ``coverage`` (B x 1 x h x w, pixels where a channel exceeds its clean maximum), added to the
    patch mask when ``coverage_in_mask`` (``config.extreme_mask``). ``margin`` (B): how far the
    evidence is past the flag (:func:`flag_margin`; None without lambda0). ``candidate`` (B long):
    which keep-mask candidate a flagged image was re-processed with (0 = Eq. 4's; -1 = not
    flagged; None when the defense does not choose among candidates).
    """

    heatmaps: Heatmaps
    soft_mask: torch.Tensor
    score: torch.Tensor
    flagged: torch.Tensor
    input_size: tuple[int, int]
    mask_threshold: float = 0.5
    mask_dilation: int = 0
    extreme_score: torch.Tensor | None = None
    coverage: torch.Tensor | None = None
    coverage_in_mask: bool = True
    margin: torch.Tensor | None = None
    candidate: torch.Tensor | None = None

    @cached_property
    def patch_mask(self) -> torch.Tensor:
        return patch_mask(self.soft_mask.detach(), self.input_size, self.mask_threshold)

    @cached_property
    def keep_mask(self) -> torch.Tensor:
        extra = self.coverage if self.coverage_in_mask else None
        return keep_mask(self.soft_mask, self.flagged, self.input_size, self.mask_threshold, self.mask_dilation, extra)


def kernel_sets(config: ZMaskConfig, layer: str) -> dict[str, Sequence[tuple[int, int]]]:
    """The SPR kernel lists a layer is refined with: "S" if it is in S, "D" if it is in D."""
    sets: dict[str, Sequence[tuple[int, int]]] = {}
    if layer in config.shallow_layers:
        sets["S"] = config.shallow_kernels
    if layer in config.deep_layers:
        sets["D"] = config.deep_kernels
    return sets


def compute_heatmaps(
    activations: Mapping[str, torch.Tensor], statistics: Mapping[str, LayerStatistics], config: ZMaskConfig,
    refiner: LayerRefiner, per_layer: bool = False,
) -> Heatmaps:
    """H_S and H_D: each layer's SPR heatmap, then the pixel-wise maximum over the layers of each set."""
    maps: dict[str, dict[str, torch.Tensor]] = {}
    for name in config.layers:
        if name not in activations:
            raise InputError(f"no activation was captured for layer {name!r}")
        if name not in statistics:
            raise InputError(f"the statistics have no layer {name!r} (they cover {sorted(statistics)}): the configuration "
                             "and the fitted state or profile belong to different fits")
        activation, stats = activations[name], statistics[name]
        if activation.dim() != 4:
            raise InputError(f"layer {name!r} gives a {activation.dim()}-D output of shape {tuple(activation.shape)}; "
                             "choose a convolutional layer (B x C x H x W)")
        if activation.shape[1] != stats.channels:
            raise InputError(
                f"layer {name!r} has {activation.shape[1]} channels but its statistics {stats.channels}: "
                "the statistics or profile belong to another model"
            )
        maps[name] = refiner.heatmaps(activation, stats, kernel_sets(config, name))
    shallow = torch.stack([maps[n]["S"] for n in config.shallow_layers]).amax(0)
    deep = torch.stack([maps[n]["D"] for n in config.deep_layers]).amax(0)
    return Heatmaps(shallow, deep, maps if per_layer else {})


def flag(score: torch.Tensor, threshold: float, extreme: torch.Tensor | None = None, extreme_threshold: float | None = None) -> torch.Tensor:
    """The decision (B bool): d > lambda0, or the extreme score above its own threshold when there is one."""
    flagged = score.detach() > threshold
    if extreme is not None and extreme_threshold is not None:
        flagged = flagged | (extreme.detach() > extreme_threshold)
    return flagged


def flag_margin(score: torch.Tensor, threshold: float, extreme: torch.Tensor | None = None,
                extreme_threshold: float | None = None) -> torch.Tensor:
    """Per image, how far the evidence is past the flag: above 0 exactly when :func:`flag` is up,
    lower for a frame that looks cleaner (each score's excess over its threshold relative to the
    threshold, the larger of the two; :func:`zmask.core.calibration.union_score`). Differentiable."""
    if extreme is not None and extreme_threshold is not None:
        return union_score(score, extreme, threshold, extreme_threshold)
    return (score - threshold) / max(abs(threshold), 1e-6)


def analyze(
    activations: Mapping[str, torch.Tensor], state: FittedState, config: ZMaskConfig, refiner: LayerRefiner,
    input_size: tuple[int, int], gate: bool = True, per_layer: bool = False,
) -> Analysis:
    """Heatmaps -> fusion block -> soft mask and score -> flag (``score > state.threshold``, or every
    image with ``gate=False``). Differentiable up to the scores; the flag and masks are not.

    With ``state.extremes`` (clean statistics of channel maxima) the extreme score is computed too
    (and the coverage, when some image is flagged and the configuration masks with it), and with
    ``state.extreme_threshold`` an image is also flagged when its extreme score exceeds it. A score
    that is not finite (an input far outside the fitted range, say) is an ``InputError``, never
    "not flagged"."""
    device = next(iter(activations.values())).device
    state = state.on_device(device)
    statistics, extremes = state.statistics, state.extremes
    if statistics is None:
        raise NotFittedError("clean statistics are missing: call fit_statistics(...) or load a profile first")
    heatmaps = compute_heatmaps(activations, statistics, config, refiner, per_layer)
    soft, score = fuse_and_score(state.fusion, heatmaps.shallow, heatmaps.deep, config.score)
    hyper = extreme_score(activations, extremes) if extremes else None
    _check_finite(score, hyper)
    margin = flag_margin(score, state.threshold, hyper, state.extreme_threshold) if state.threshold is not None else None
    if gate:
        if state.threshold is None:
            raise NotFittedError("the threshold lambda0 is not set: call calibrate(...) or pass gate=False")
        flagged = flag(score, state.threshold, hyper, state.extreme_threshold)
    else:
        flagged = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    # Only masking reads the coverage: a batch with nothing flagged (a clean frame) never pays for it.
    masks_with_coverage = config.extreme_mask or config.mask_candidates
    coverage = coverage_map(activations, extremes) if extremes and masks_with_coverage and bool(flagged.any()) else None
    return Analysis(heatmaps, soft, score, flagged, (int(input_size[0]), int(input_size[1])), config.mask_threshold, config.mask_dilation,
                    hyper, coverage, config.extreme_mask, margin)


def _check_finite(score: torch.Tensor, extreme: torch.Tensor | None) -> None:
    """Refuse NaN/Inf scores: ``NaN > lambda0`` is False, which would pass an image as clean."""
    values = score.detach() if extreme is None else torch.cat([score.detach().flatten(), extreme.detach().flatten()])
    if not bool(torch.isfinite(values).all()):
        bad = (~torch.isfinite(score.detach())).nonzero().flatten().tolist()
        raise InputError(f"the detection score is not finite for images {bad or 'of the batch'}: the input is far outside the range "
                         "the model was fitted on (images must be finite, RGB in [0, 1])")
