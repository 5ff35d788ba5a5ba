"""Evidence-guided masking: the candidate keep-masks of a flagged frame.

A patch that suppresses its own spatial Z-score heat leaves Z-Mask's soft mask empty while the
channel-extreme evidence still fires; masking the whole extreme coverage spreads far beyond the
patch. So a flagged frame gets a few candidate keep-masks, each is tried by re-running the
network (:meth:`zmask.ZMask.forward`), and :func:`better_candidate` picks one. The candidates, in
order (ties go to the earlier one):

1. the Z-Mask keep-mask of Eq. 4 (the paper's choice);
2. the bounding boxes of the largest connected regions of the channel-extreme coverage map;
3. windows of the patch sizes the profile was fitted for (``ZMaskConfig.candidate_windows``),
   centred where the soft mask, and where the coverage, is densest at that size;
4. with ``candidate_choice="effect"``, windows the evidence does not place: the image tiled by
   windows of the largest patch size at half their size (:func:`search_windows`), so that every
   patch of that size is mostly covered by one of them.

Two rules choose (:func:`better_candidate`): "clearance", the smallest mask whose re-pass is no
longer flagged (:func:`zmask.core.analysis.flag_margin` <= 0), else the lowest margin; "effect",
among the masks that remove some of the evidence (the re-pass's margin is below the first pass's)
and hide at most twice the largest patch, the one whose removal changes the output most
(:mod:`zmask.core.effect`), else the lowest margin. Evidence can be steered by the attacker (a
decoy made to look hot, a patch whose removal still leaves a little evidence under a tight
threshold); the effect of removing the patch is the attack itself.

Pure functions of one analysis; the re-passes and the choice are the defense's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .masking import MaskEvidence, dilate_mask

Box = tuple[int, int, int, int]  # top, left, bottom, right in input pixels (bottom/right exclusive)


class Trial(NamedTuple):
    """What one candidate's re-pass showed: its flag margin, the masked area (input pixels) and,
    for the "effect" rule, how much the output changed (:func:`zmask.core.effect.output_change`)
    and whether the candidate may win on that change (``eligible``: it removed some of the
    evidence and hides no more than twice the largest patch)."""

    margin: float
    area: float
    change: float = 0.0
    eligible: bool = True


def better_candidate(candidate: tuple, incumbent: tuple, choice: str = "clearance") -> bool:
    """Whether a candidate :class:`Trial` beats the incumbent.

    "clearance": a re-pass that clears the flag (margin <= 0) beats one that does not; between two
    that clear it the smaller mask (the least occlusion that removes the evidence: masking more of
    the scene would always look clean, and costs the task); between two that do not, the lower
    margin. "effect": an eligible candidate beats an ineligible one; between two eligible ones the
    larger change of the output, then the smaller mask; between two ineligible ones the lower
    margin. Equal is not better, so the earlier candidate keeps a tie."""
    new, best = Trial(*candidate), Trial(*incumbent)
    if choice == "effect":
        if new.eligible != best.eligible:
            return new.eligible
        if not new.eligible:
            return new.margin < best.margin
        if new.change != best.change:
            return new.change > best.change
        return new.area < best.area
    clears, best_clears = new.margin <= 0.0, best.margin <= 0.0
    if clears != best_clears:
        return clears
    return new.area < best.area if clears else new.margin < best.margin


def tile_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of ``window`` in ``length``, evenly spread from 0 to ``length - window``, no two
    consecutive ones more than ``stride`` apart."""
    if window >= length:
        return [0]
    count = -(-(length - window) // max(1, stride)) + 1
    return [round(k * (length - window) / (count - 1)) for k in range(count)]


def cover(window: tuple[int, int], area: Box, stride: tuple[int, int]) -> list[Box]:
    """Windows of ``window`` (clipped to the area) tiling the box ``area``, row-major."""
    top, left, bottom, right = area
    height, width = min(window[0], bottom - top), min(window[1], right - left)
    return [(top + row, left + col, top + row + height, left + col + width)
            for row in tile_starts(bottom - top, height, stride[0]) for col in tile_starts(right - left, width, stride[1])]


MAX_SEARCH_WINDOWS = 64  # re-passes the evidence-free search may add to a flagged frame


def search_windows(windows: Sequence[tuple[int, int]], input_size: tuple[int, int], max_windows: int = MAX_SEARCH_WINDOWS) -> list[Box]:
    """The evidence-free candidates of the "effect" rule: the image tiled by windows of the
    largest of ``windows``, spaced by at most half their size (more when that would make more
    than ``max_windows``), so that every patch of that size is mostly covered by one of them."""
    height, width = max(windows, key=lambda hw: (hw[0] * hw[1], hw))
    stride = [-(-height // 2), -(-width // 2)]
    while True:
        boxes = cover((height, width), (0, 0, *input_size), (stride[0], stride[1]))
        if len(boxes) <= max_windows:
            return boxes
        stride = [stride[0] + -(-stride[0] // 4), stride[1] + -(-stride[1] // 4)]


def region_boxes(coverage: torch.Tensor, max_regions: int) -> list[Box]:
    """Boxes (in the map's cells) of the ``max_regions`` largest 8-connected regions of one binary
    h x w map, largest first."""
    from scipy import ndimage

    labels, count = ndimage.label(coverage.detach().cpu().numpy() > 0.5, structure=[[1, 1, 1]] * 3)
    if count == 0 or max_regions < 1:
        return []
    sizes = ndimage.sum_labels(labels > 0, labels, index=range(1, count + 1))
    slices = ndimage.find_objects(labels)
    largest = sorted(range(count), key=lambda k: (-float(sizes[k]), k))[:max_regions]
    return [(slices[k][0].start, slices[k][1].start, slices[k][0].stop, slices[k][1].stop) for k in largest]


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """A box of a ``from_size`` grid as the pixels of ``to_size`` it covers (outward rounding)."""
    (fh, fw), (th, tw) = from_size, to_size
    top, left, bottom, right = box
    return (top * th // fh, left * tw // fw, -(-bottom * th // fh), -(-right * tw // fw))


def peak_window(heat: torch.Tensor, window: tuple[int, int], input_size: tuple[int, int]) -> Box:
    """The box of ``window`` input pixels, inside the image, whose mean of ``heat`` (h x w, any
    resolution, nearest-stretched over the image) is the largest (the first such, row-major)."""
    height, width = int(heat.shape[-2]), int(heat.shape[-1])
    cells = (max(1, min(height, round(window[0] * height / input_size[0]))), max(1, min(width, round(window[1] * width / input_size[1]))))
    pooled = F.avg_pool2d(heat.detach().float().view(1, 1, height, width), cells, stride=1)
    position = int(pooled.flatten().argmax())
    row, col = divmod(position, int(pooled.shape[-1]))
    top, left, _, _ = scale_box((row, col, row + cells[0], col + cells[1]), (height, width), input_size)
    top, left = min(top, max(input_size[0] - window[0], 0)), min(left, max(input_size[1] - window[1], 0))
    return (top, left, min(top + window[0], input_size[0]), min(left + window[1], input_size[1]))


def box_keep_mask(box: Box, input_size: tuple[int, int], dilation: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """1 x H x W keep-mask (1 = keep) with ``box`` (grown by ``dilation`` pixels) set to 0."""
    masked = torch.zeros(1, 1, *input_size, device=device)
    top, left, bottom, right = box
    masked[..., top:bottom, left:right] = 1.0
    return 1.0 - dilate_mask(masked, dilation)[0]


def candidate_keep_masks(analysis: MaskEvidence, keep: torch.Tensor, image: int, windows: Sequence[tuple[int, int]],
                         max_regions: int, extra_boxes: Sequence[Box] = ()) -> torch.Tensor:
    """K x 1 x H x W candidate keep-masks of image ``image`` of a flagged batch (``keep``: the
    batch's Eq. 4 keep-masks), then ``extra_boxes`` (input pixels), duplicates removed, the
    Z-Mask keep-mask first."""
    size = (int(analysis.input_size[0]), int(analysis.input_size[1]))
    candidates = [keep[image]]
    dilation = analysis.mask_dilation
    coverage = analysis.coverage[image, 0] if analysis.coverage is not None else None
    if coverage is not None:
        grid = (int(coverage.shape[-2]), int(coverage.shape[-1]))
        candidates += [box_keep_mask(scale_box(box, grid, size), size, dilation, keep.device) for box in region_boxes(coverage, max_regions)]
    heats = [analysis.soft_mask[image, 0]] + ([coverage] if coverage is not None and bool(coverage.any()) else [])
    for window in windows:
        window = (min(int(window[0]), size[0]), min(int(window[1]), size[1]))
        candidates += [box_keep_mask(peak_window(heat, window, size), size, dilation, keep.device) for heat in heats]
    candidates += [box_keep_mask(box, size, dilation, keep.device) for box in extra_boxes]
    unique: list[torch.Tensor] = []
    for candidate in candidates:
        if not any(torch.equal(candidate, seen) for seen in unique):
            unique.append(candidate)
    return torch.stack(unique)
