"""The two thresholds of the layered flag are chosen together (calibrate_union)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zmask.core.calibration import calibrate_threshold, calibrate_union, clean_anchored_threshold, union_score
from zmask.errors import InputError


def _rates(threshold_pair, clean, patched):
    (t1, t2), (c1, c2), (p1, p2) = threshold_pair, clean, patched
    return float(((c1 > t1) | (c2 > t2)).mean()), float(((p1 > t1) | (p2 > t2)).mean())


def test_each_score_catches_its_own_attacks_and_the_union_catches_both():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    # half the patched images raise only the first score, half only the second
    patched = np.r_[rng.normal(4, 1, 50), rng.normal(0, 1, 50)], np.r_[rng.normal(0, 1, 50), rng.normal(4, 1, 50)]
    joint, first, second = calibrate_union(*clean[:1], *patched[:1], clean[1], patched[1], target_fpr=0.05)
    fpr, tpr = _rates((joint.threshold, second.threshold), clean, patched)
    assert (fpr, tpr) == (joint.false_positive_rate, joint.true_positive_rate)
    assert fpr <= 0.05
    assert tpr > 0.85  # either score alone catches at most about half
    assert first.true_positive_rate < 0.6 and second.true_positive_rate < 0.6
    # two thresholds each calibrated at 5% alone would let the combination exceed the target
    alone = calibrate_threshold(clean[0], patched[0], 0.05).threshold, calibrate_threshold(clean[1], patched[1], 0.05).threshold
    assert _rates(alone, clean, patched)[0] > joint.false_positive_rate


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 0.0, 0.1, 0.3]))
def test_the_chosen_pair_is_optimal_among_all_pairs(seed, target):
    rng = np.random.default_rng(seed)
    clean = rng.normal(0, 1, 12).round(1), rng.normal(0, 1, 12).round(1)
    patched = rng.normal(1, 1, 9).round(1), rng.normal(1, 1, 9).round(1)
    joint, _, second = calibrate_union(clean[0], patched[0], clean[1], patched[1], target_fpr=target)
    fpr, tpr = _rates((joint.threshold, second.threshold), clean, patched)
    assert (fpr, tpr) == pytest.approx((joint.false_positive_rate, joint.true_positive_rate))
    values = [np.r_[clean[k], patched[k], -1e9, 1e9] for k in range(2)]
    best = -np.inf
    for t1 in values[0]:
        for t2 in values[1]:
            f, t = _rates((t1, t2), clean, patched)
            if target is None:
                best = max(best, t - f)
            elif f <= target:
                best = max(best, t)
    assert (tpr - fpr if target is None else tpr) == pytest.approx(best)
    if target is not None:
        assert fpr <= target


def test_the_second_score_alone_is_bounded():
    rng = np.random.default_rng(1)
    clean = rng.normal(0, 1, 100), rng.normal(0, 1, 100)
    patched = rng.normal(0, 1, 100), rng.normal(1, 1, 100)
    _, _, second = calibrate_union(clean[0], patched[0], clean[1], patched[1], target_fpr=0.2, second_fpr=0.03)
    assert second.false_positive_rate <= 0.03


def test_union_score_is_positive_exactly_when_flagged():
    first, second = torch.tensor([0.1, 0.5, 0.2, 0.9]), torch.tensor([1.0, 1.0, 7.0, 0.0])
    margin = union_score(first, second, 0.4, 5.0)
    assert torch.equal(margin > 0, (first > 0.4) | (second > 5.0))
    assert isinstance(union_score(first.numpy(), second.numpy(), 0.4, 5.0), np.ndarray)


def test_mismatched_or_bad_scores_are_refused():
    with pytest.raises(InputError, match="same clean and patched images"):
        calibrate_union([0.1, 0.2], [0.9], [0.1], [0.9])
    with pytest.raises(InputError, match="target_fpr"):
        calibrate_union([0.1], [0.9], [0.1], [0.9], target_fpr=2.0)
    with pytest.raises(InputError, match="NaN"):
        calibrate_union([float("nan")], [0.9], [0.1], [0.9])


def test_when_both_scores_separate_both_stay_active():
    """A score that separates perfectly on its own must not switch the other off ("never flag")."""
    clean = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0])
    patched = np.array([0.8, 0.9]), np.array([70.0, 80.0])
    joint, first, second = calibrate_union(clean[0], patched[0], clean[1], patched[1])
    assert (joint.true_positive_rate, joint.false_positive_rate) == (1.0, 0.0)
    assert first.true_positive_rate == 1.0 and second.true_positive_rate == 1.0
    assert 0.3 < first.threshold < 0.8 and 3.0 < second.threshold < 70.0


def _kind_rates(flags: np.ndarray, kinds: np.ndarray) -> float:
    return max(float(flags[kinds == kind].mean()) for kind in np.unique(kinds))


def test_a_rare_kind_of_negative_cannot_take_every_allowed_false_alarm():
    """Plain frames score low, frames with a harmless occluder in the middle: pooled, the 5% bound
    lets the threshold sit inside the occluded scores; per kind, it must clear them too."""
    rng = np.random.default_rng(2)
    plain, occluded, patched = rng.normal(0, 0.1, 150), rng.normal(1.0, 0.1, 20), rng.normal(2.0, 0.5, 100)
    clean = np.r_[plain, occluded]
    kinds = np.r_[np.zeros(plain.size), np.ones(occluded.size)]
    pooled = calibrate_threshold(clean, patched, 0.05)
    assert (occluded > pooled.threshold).mean() > 0.2  # the flaw: 7 of 20 allowed false alarms fall on occluded frames
    per_kind = calibrate_threshold(clean, patched, 0.05, negative_kinds=kinds)
    assert per_kind.criterion == "fpr<=0.05 per negative kind"
    assert _kind_rates(clean > per_kind.threshold, kinds) <= 0.05
    # the highest TPR that keeps every kind within the bound (brute force over all thresholds)
    best = max((patched > t).mean() for t in np.r_[clean, patched, -1e9] if _kind_rates(clean > t, kinds) <= 0.05)
    assert per_kind.true_positive_rate == pytest.approx(best)
    assert per_kind.false_positive_rate == pytest.approx((clean > per_kind.threshold).mean())  # pooled, as reported
    # one kind only, or Youden's J: the same as without kinds
    assert calibrate_threshold(clean, patched, 0.05, negative_kinds=np.zeros(clean.size)) == pooled
    assert calibrate_threshold(clean, patched, None, negative_kinds=kinds) == calibrate_threshold(clean, patched, None)
    with pytest.raises(InputError, match="one per clean image"):
        calibrate_threshold(clean, patched, 0.05, negative_kinds=kinds[:-1])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.1, 0.3]))
def test_the_joint_bound_holds_for_each_kind_of_negative(seed, target):
    rng = np.random.default_rng(seed)
    clean = rng.normal(0, 1, 14).round(1), rng.normal(0, 1, 14).round(1)
    kinds = np.r_[np.zeros(9), np.ones(5)]
    patched = rng.normal(1, 1, 9).round(1), rng.normal(1, 1, 9).round(1)
    joint, _, second = calibrate_union(clean[0], patched[0], clean[1], patched[1], target_fpr=target, negative_kinds=kinds)
    flags = (clean[0] > joint.threshold) | (clean[1] > second.threshold)
    assert _kind_rates(flags, kinds) <= target
    values = [np.r_[clean[k], patched[k], -1e9, 1e9] for k in range(2)]
    best = max(_rates((t1, t2), clean, patched)[1] for t1 in values[0] for t2 in values[1]
               if _kind_rates((clean[0] > t1) | (clean[1] > t2), kinds) <= target)
    assert joint.true_positive_rate == pytest.approx(best)


def test_clean_anchored_thresholds_sit_just_above_the_clean_scores_whatever_the_patches_score():
    clean = torch.tensor([0.1, 0.2, 0.3, 0.5])
    assert clean_anchored_threshold(clean, 1.0) == pytest.approx(0.5 + (0.5 - 0.25))
    assert clean_anchored_threshold(clean, 0.0) == pytest.approx(0.5)
    near, far = torch.tensor([0.9, 1.0]), torch.tensor([90.0, 100.0])
    # ROC puts the threshold in the gap to the patches at hand: far patches move it far up
    assert calibrate_threshold(clean, far).threshold > 10 * calibrate_threshold(clean, near).threshold
    # the clean anchor does not move with them, and still flags both
    for patched in (near, far):
        anchored = calibrate_threshold(clean, patched, headroom=1.0)
        assert anchored.threshold == pytest.approx(0.75) and anchored.true_positive_rate == 1.0 and anchored.false_positive_rate == 0.0
    joint, first, second = calibrate_union(clean, far, clean * 10, far * 10, headroom=0.5)
    assert first.threshold == pytest.approx(0.5 + 0.5 * 0.25) and second.threshold == pytest.approx(5.0 + 0.5 * 2.5)
    assert joint.threshold == first.threshold and second.criterion == "clean max + 0.5 x (max - median)"
    assert joint.true_positive_rate == 1.0 and joint.false_positive_rate == 0.0


def test_headroom_is_refused_beside_a_target_fpr_or_when_negative():
    clean, patched = torch.tensor([0.1, 0.2]), torch.tensor([0.9])
    with pytest.raises(InputError, match="not both"):
        calibrate_threshold(clean, patched, target_fpr=0.05, headroom=1.0)
    with pytest.raises(InputError, match="not both"):
        calibrate_union(clean, patched, clean, patched, target_fpr=0.05, headroom=1.0)
    with pytest.raises(InputError, match="headroom"):
        calibrate_threshold(clean, patched, headroom=-1.0)
