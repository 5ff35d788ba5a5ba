"""Evidence-guided masking: candidate keep-masks and the defense's choice among them."""

from __future__ import annotations

import pytest
import torch

from zmask import ConfigError, ZMask
from zmask.core.candidates import (better_candidate, box_keep_mask, candidate_keep_masks, peak_window, region_boxes, scale_box,
                                   search_windows)
from zmask.core.effect import output_change
from zmask.core.masking import mask_iou

from ..toy import TOY_CONFIG, clean_batches, fitted_toy_defense, patched_batch, seeded_toy


def test_regions_come_largest_first_with_their_boxes():
    coverage = torch.zeros(10, 12)
    coverage[1:3, 1:3] = 1  # 4 cells
    coverage[5:9, 6:11] = 1  # 20 cells
    coverage[0, 11] = 1  # 1 cell
    assert region_boxes(coverage, 2) == [(5, 6, 9, 11), (1, 1, 3, 3)]
    assert region_boxes(torch.zeros(4, 4), 3) == []
    assert scale_box((5, 6, 9, 11), (10, 12), (100, 120)) == (50, 60, 90, 110)


def test_the_peak_window_covers_the_hot_spot_and_stays_inside():
    heat = torch.zeros(24, 32)
    heat[10:14, 20:26] = 1.0
    top, left, bottom, right = peak_window(heat, (16, 24), (96, 128))
    assert (bottom - top, right - left) == (16, 24)
    assert top <= 40 and bottom >= 56 and left <= 80 and right >= 104  # the spot spans rows 40-56, columns 80-104
    corner = torch.zeros(24, 32)
    corner[-1, -1] = 1.0
    assert peak_window(corner, (16, 24), (96, 128))[2:] == (96, 128)
    keep = box_keep_mask((2, 3, 5, 7), (8, 10))
    assert keep.shape == (1, 8, 10) and keep.sum() == 80 - 12 and keep[0, 2:5, 3:7].sum() == 0


def _layered_toy(mask_threshold: float = 0.5) -> ZMask:
    config = TOY_CONFIG.replace(extreme_layers=("c2", "c3"), mask_candidates=True, candidate_windows=((32, 32),),
                                mask_threshold=mask_threshold)
    return fitted_toy_defense(config, epochs=10)


def test_a_flagged_frame_is_reprocessed_with_the_candidate_that_looks_cleanest():
    defense = _layered_toy()
    images, _ = patched_batch(3, seed=321)
    images = torch.cat([images, clean_batches(1, 1, seed=5)[0]])
    with torch.no_grad():
        result = defense(images)
        analysis = result.detection
        assert analysis.candidate is not None and analysis.flagged[:3].all()
        assert torch.equal(analysis.candidate < 0, ~analysis.flagged)
        index = analysis.flagged.nonzero().flatten()
        # the output is the model on the image masked with the chosen keep-mask
        chosen = defense.apply_mask(images[index], analysis.keep_mask[index])
        assert torch.allclose(result.output[index], defense.model(chosen), atol=1e-6)
        # and it is the candidate the rule prefers: the smallest mask whose re-pass clears the
        # flag, else the lowest margin
        keep = defense.detect(images, gate=True).keep_mask
        size = tuple(images.shape[-2:])
        for slot, image in enumerate(index.tolist()):
            candidates = candidate_keep_masks(analysis, keep, image, defense.config.candidate_windows, defense.config.candidate_regions)
            margins = defense.analyze(defense.capture(defense.apply_mask(images[image:image + 1].expand(len(candidates), -1, -1, -1),
                                                                         candidates))[1], size, gate=False).margin.tolist()
            areas = (1 - candidates).flatten(1).sum(1).tolist()
            clearing = [k for k, m in enumerate(margins) if m <= 0]
            expected = min(clearing, key=lambda k: (areas[k], k)) if clearing else min(range(len(margins)), key=lambda k: (margins[k], k))
            assert int(analysis.candidate[image]) == expected
        if not bool(analysis.flagged[3]):
            assert torch.allclose(result.output[3:], defense.model(images[3:]), atol=1e-6)


def test_with_an_empty_soft_mask_the_candidates_still_find_the_patch():
    """Eq. 4's mask is empty (a soft-mask threshold no heat reaches, as after a heat-suppressing
    attack); a coverage region or a window must then cover the patch."""
    defense = _layered_toy(mask_threshold=0.999)
    images, masks = patched_batch(4, seed=77)
    with torch.no_grad():
        analysis = defense(images).detection
    flagged = analysis.flagged
    assert flagged.any()
    assert (analysis.candidate[flagged] > 0).all()  # Eq. 4's empty mask never wins
    iou = mask_iou(1 - analysis.keep_mask[flagged], masks[flagged])
    assert float(iou.mean()) > 0.3


def test_choosing_candidates_needs_a_calibrated_defense_and_bounded_settings():
    with pytest.raises(ConfigError, match="candidate_windows"):
        TOY_CONFIG.replace(candidate_windows=((0, 4),))
    with pytest.raises(ConfigError, match="candidate_windows"):
        TOY_CONFIG.replace(candidate_windows=((4, 4),) * 5)
    with pytest.raises(ConfigError, match="candidate_regions"):
        TOY_CONFIG.replace(candidate_regions=100)
    defense = ZMask(seeded_toy(), TOY_CONFIG.replace(mask_candidates=True), seed=0)
    defense.fit_statistics(clean_batches(2))
    from zmask.errors import NotFittedError

    with pytest.raises(NotFittedError, match="lambda0"):
        defense(patched_batch(1)[0], gate=False)


def test_the_choice_does_not_depend_on_how_the_candidates_are_batched():
    """Candidates are re-run in batches of the input's size: a batch of one image and the same
    image in a larger batch get the same keep-mask and output."""
    from zmask.defense import concat_outputs, take_outputs

    defense = _layered_toy()
    images, _ = patched_batch(3, seed=5)
    with torch.no_grad():
        together = defense(images)
        alone = [defense(images[i:i + 1]) for i in range(3)]
    for i, single in enumerate(alone):
        assert torch.equal(single.detection.keep_mask[0], together.detection.keep_mask[i])
        assert torch.allclose(single.output[0], together.output[i], atol=1e-5)
    outputs = [{"boxes": torch.ones(1, 4) * k, "parts": (torch.zeros(1), [k])} for k in range(3)]
    joined = concat_outputs(outputs)
    assert joined["boxes"][:, 0].tolist() == [0.0, 1.0, 2.0] and joined["parts"][1] == [0, 1, 2]
    assert take_outputs(joined, torch.tensor([2, 0]))["parts"][1] == [2, 0]


def test_the_smallest_mask_that_clears_the_flag_wins():
    assert better_candidate((-0.5, 100.0), (-0.9, 400.0))  # both clear: the smaller mask
    assert not better_candidate((-0.9, 400.0), (-0.5, 100.0))
    assert better_candidate((-0.1, 900.0), (0.2, 10.0))  # clearing beats not clearing
    assert better_candidate((0.3, 900.0), (0.5, 10.0))  # neither clears: the lower margin
    assert not better_candidate((-0.5, 100.0), (-0.5, 100.0))  # a tie keeps the incumbent


def test_the_effect_rule_prefers_the_eligible_mask_that_changes_the_output_most():
    # (margin, area, change, eligible)
    assert better_candidate((0.4, 400.0, 0.3, True), (-0.9, 100.0, 0.1, True), "effect")  # the larger change, cleared or not
    assert not better_candidate((-0.9, 100.0, 0.1, True), (0.4, 400.0, 0.3, True), "effect")
    assert better_candidate((-0.1, 100.0, 0.3, True), (-0.1, 400.0, 0.3, True), "effect")  # same change: the smaller mask
    assert better_candidate((5.0, 900.0, 0.0, True), (-0.2, 10.0, 0.9, False), "effect")  # eligibility comes first
    assert better_candidate((0.3, 900.0, 0.0, False), (0.5, 10.0, 0.9, False), "effect")  # neither: the lower margin
    assert not better_candidate((-0.5, 100.0, 0.2, True), (-0.5, 100.0, 0.2, True), "effect")


@pytest.mark.parametrize("window, size", [((105, 141), (360, 480)), ((32, 32), (96, 128)), ((50, 70), (60, 80)), ((8, 8), (8, 30))])
def test_every_patch_of_the_window_size_is_mostly_covered_by_a_search_window(window, size):
    boxes = search_windows([window, (window[0] // 2, window[1] // 2)], size)
    assert len(boxes) <= 64 and len(set(boxes)) == len(boxes)
    assert all(0 <= top < bottom <= size[0] and 0 <= left < right <= size[1] for top, left, bottom, right in boxes)
    assert all((bottom - top, right - left) == (min(window[0], size[0]), min(window[1], size[1])) for top, left, bottom, right in boxes)
    for row in range(0, size[0] - window[0] + 1, 3):
        for col in range(0, size[1] - window[1] + 1, 3):
            best = max(max(0, min(row + window[0], b) - max(row, t)) * max(0, min(col + window[1], r) - max(col, l))
                       for t, l, b, r in boxes)
            assert best >= 0.56 * window[0] * window[1] - 1e-9, (row, col)  # at most a quarter off on each side
    many = search_windows([(4, 4)], (200, 200))
    assert len(many) <= 64  # the stride grows rather than the number of re-passes


def test_the_effect_choice_reprocesses_with_the_eligible_candidate_of_largest_output_change():
    defense = _layered_toy()
    defense.config = defense.config.replace(candidate_choice="effect")
    images, masks = patched_batch(3, seed=321)
    size = tuple(images.shape[-2:])
    with torch.no_grad():
        first = defense.model(images)
        result = defense(images)
        analysis = result.detection
        index = analysis.flagged.nonzero().flatten()
        assert len(index) > 0
        chosen = defense.apply_mask(images[index], analysis.keep_mask[index])
        assert torch.allclose(result.output[index], defense.model(chosen), atol=1e-6)
        gated = defense.detect(images, gate=True)
        searched = search_windows(defense.config.candidate_windows, size)
        largest = max(h * w for h, w in defense.config.candidate_windows)
        for image in index.tolist():
            candidates = candidate_keep_masks(analysis, gated.keep_mask, image, defense.config.candidate_windows,
                                              defense.config.candidate_regions, searched)
            masked = defense.apply_mask(images[image:image + 1].expand(len(candidates), -1, -1, -1), candidates)
            rerun, activations = defense.capture(masked)
            margins = defense.analyze(activations, size, gate=False).margin.tolist()
            change = output_change(first[image:image + 1].expand(len(candidates), -1, -1, -1), rerun, candidates).tolist()
            areas = (1 - candidates).flatten(1).sum(1).tolist()
            eligible = [k for k in range(len(candidates)) if margins[k] < float(gated.margin[image]) and areas[k] <= 2 * largest]
            expected = (min(eligible, key=lambda k: (-change[k], areas[k], k)) if eligible
                        else min(range(len(margins)), key=lambda k: (margins[k], k)))
            assert int(analysis.candidate[image]) == expected
