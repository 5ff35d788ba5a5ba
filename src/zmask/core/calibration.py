"""Choosing the detection threshold lambda0: by ROC analysis of clean vs patched scores, or from
the clean scores alone (:func:`clean_anchored_threshold`).

ROC places the threshold in the gap between the clean scores and those of the patches at hand,
often far above anything a clean image scores; an adaptive attacker then only has to bring its
score under that threshold, not into the clean range. A clean-anchored threshold (``headroom``)
sits just above the clean scores, whatever the patches score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold and the operating point it gives on the calibration scores."""

    threshold: float
    true_positive_rate: float
    false_positive_rate: float
    auc: float
    criterion: str


def _as_scores(values, name: str) -> np.ndarray:
    array = np.asarray(torch.as_tensor(values).detach().cpu().double().flatten())
    if array.size == 0:
        raise InputError(f"{name} is empty: calibration needs clean and patched scores")
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or Inf")
    return array


def roc_auc(clean_scores, patched_scores) -> float:
    """Area under the ROC curve of clean (negative) vs patched (positive) scores (sequences, arrays
    or tensors); nan when either side is empty. The one AUC of the project: calibration, the
    evaluation reports, their bootstrap intervals and the layer evidence all call it."""
    from sklearn.metrics import roc_auc_score

    clean = np.asarray(torch.as_tensor(clean_scores).detach().cpu().double().flatten())
    patched = np.asarray(torch.as_tensor(patched_scores).detach().cpu().double().flatten())
    if clean.size == 0 or patched.size == 0:
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(clean.size), np.ones(patched.size)], np.r_[clean, patched]))


def negative_kind_labels(kinds, count: int) -> np.ndarray | None:
    """``kinds`` (one label per clean score, or None) as an integer array, checked against ``count``."""
    if kinds is None:
        return None
    labels = np.asarray(torch.as_tensor(kinds).detach().cpu().long().flatten())
    if labels.size != count:
        raise InputError(f"negative_kinds has {labels.size} labels for {count} clean scores: give one per clean image")
    return labels


def clean_anchored_threshold(clean_scores, headroom: float) -> float:
    """The highest clean score plus ``headroom`` times its distance to the clean median: the
    threshold sits just above the clean range, the distance measured in the scores' own spread."""
    clean = _as_scores(clean_scores, "clean_scores")
    if not (np.isfinite(headroom) and headroom >= 0.0):
        raise InputError(f"headroom={headroom} must be a finite number >= 0")
    highest = float(clean.max())
    return highest + float(headroom) * (highest - float(np.median(clean)))


def _operating_point(clean: np.ndarray, patched: np.ndarray, threshold: float, criterion: str) -> Calibration:
    """What ``score > threshold`` does on the calibration scores."""
    return Calibration(threshold, float((patched > threshold).mean()), float((clean > threshold).mean()), roc_auc(clean, patched), criterion)


def _union_operating_point(clean: np.ndarray, patched: np.ndarray, clean2: np.ndarray, patched2: np.ndarray, first_threshold: float,
                           second_threshold: float, criterion: str) -> tuple[Calibration, Calibration, Calibration]:
    """What ``first > t1 or second > t2`` does on the calibration scores: (the combination, whose
    threshold is t1 and whose AUC is that of :func:`union_score`; the first score alone; the second)."""
    clean_flags = (clean > first_threshold) | (clean2 > second_threshold)
    patched_flags = (patched > first_threshold) | (patched2 > second_threshold)
    combined_auc = roc_auc(union_score(clean, clean2, first_threshold, second_threshold),
                           union_score(patched, patched2, first_threshold, second_threshold))
    joint = Calibration(first_threshold, float(patched_flags.mean()), float(clean_flags.mean()), combined_auc, criterion)
    return joint, _operating_point(clean, patched, first_threshold, criterion), _operating_point(clean2, patched2, second_threshold, criterion)


def _anchored_criterion(headroom: float) -> str:
    return f"clean max + {headroom:g} x (max - median)"


def _check_criterion(target_fpr: float | None, headroom: float | None) -> None:
    if target_fpr is not None and headroom is not None:
        raise InputError("give target_fpr (an ROC operating point) or headroom (a threshold from the clean scores alone), not both")


def calibrate_threshold(clean_scores, patched_scores, target_fpr: float | None = None, negative_kinds=None,
                        headroom: float | None = None) -> Calibration:
    """lambda0 such that ``score > lambda0`` flags an attack.

    Default criterion: Youden's J (max TPR - FPR). With ``target_fpr``, the operating point with
    the highest TPR whose FPR does not exceed it. The threshold is placed halfway between the
    lowest flagged score and the next lower score, so the strict comparison reproduces the point.

    ``negative_kinds``: a label per clean score (e.g. 0 for a plain frame, 1 for a frame with a
    harmless occluder). With ``target_fpr`` the bound then holds for each kind's own false-alarm
    rate - the threshold is the highest of the kinds' own thresholds - so that the false alarms
    the bound allows cannot all fall on the rarer kind. The reported FPR pools the kinds; Youden's
    J pools them too.

    ``headroom`` (instead of an ROC criterion): :func:`clean_anchored_threshold` of the clean
    scores (every kind pooled); the patched scores only give the reported TPR and AUC.
    """
    from sklearn.metrics import roc_curve

    clean = _as_scores(clean_scores, "clean_scores")
    patched = _as_scores(patched_scores, "patched_scores")
    _check_criterion(target_fpr, headroom)
    if headroom is not None:
        return _operating_point(clean, patched, clean_anchored_threshold(clean, headroom), _anchored_criterion(headroom))
    if target_fpr is not None and not 0.0 <= target_fpr <= 1.0:
        raise InputError(f"target_fpr={target_fpr} must lie in [0, 1]")
    kinds = negative_kind_labels(negative_kinds, clean.size)
    if target_fpr is not None and kinds is not None and np.unique(kinds).size > 1:
        threshold = max(calibrate_threshold(clean[kinds == kind], patched, target_fpr).threshold for kind in np.unique(kinds))
        return _operating_point(clean, patched, threshold, f"fpr<={target_fpr} per negative kind")
    labels = np.concatenate([np.zeros(clean.size), np.ones(patched.size)])
    scores = np.concatenate([clean, patched])
    fpr, tpr, thresholds = roc_curve(labels, scores)
    if target_fpr is None:
        index, criterion = int(np.argmax(tpr - fpr)), "youden"
    else:
        allowed = np.flatnonzero(fpr <= target_fpr)
        index, criterion = int(allowed[np.argmax(tpr[allowed])]), f"fpr<={target_fpr}"
    lowest_flagged = thresholds[index]
    if not np.isfinite(lowest_flagged):  # sklearn's first point flags nothing
        threshold = float(scores.max())
    else:
        below = scores[scores < lowest_flagged]
        threshold = float((lowest_flagged + below.max()) / 2) if below.size else float(lowest_flagged) - 1e-12
    return _operating_point(clean, patched, threshold, criterion)


MAX_CANDIDATES = 1024  # thresholds tried per score by calibrate_union


def _candidate_thresholds(values: np.ndarray) -> np.ndarray:
    """Every distinct way ``score > t`` can split ``values``: midpoints between consecutive
    distinct values, one below the smallest (flags all) and the largest value (flags none)."""
    distinct = np.unique(values)
    if distinct.size > MAX_CANDIDATES:  # a large calibration set: evenly spaced order statistics
        distinct = distinct[np.linspace(0, distinct.size - 1, MAX_CANDIDATES).round().astype(int)]
    below = distinct[0] - max(1e-12, 1e-9 * abs(distinct[0]))
    return np.concatenate([[below], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1]]])


def calibrate_union(clean_scores, patched_scores, clean_second, patched_second, target_fpr: float | None = None,
                    second_fpr: float | None = None, negative_kinds=None,
                    headroom: float | None = None) -> tuple[Calibration, Calibration, Calibration]:
    """Thresholds (t1, t2) of the flag ``first > t1 or second > t2``, chosen together so that the
    false-alarm rate of the combination is what ``target_fpr`` bounds (two thresholds calibrated
    one by one would add their false alarms).

    Every pair of thresholds that splits the calibration scores differently is tried: with
    ``target_fpr`` the pair with the highest TPR whose combined FPR does not exceed it, otherwise
    Youden's J of the combination; ``second_fpr`` bounds the share of clean images the second
    score flags on its own. Ties go to the lower FPR, then to the pair whose scores flag the most
    patched and the fewest clean images on their own (both kinds of evidence stay active), then to
    the higher thresholds. Returns
    (the combined operating point, whose threshold is t1 and whose AUC is that of the combined
    score :func:`union_score`; the first score alone at t1; the second alone at t2).
    ``negative_kinds`` as in :func:`calibrate_threshold`: with ``target_fpr``, the combination's
    false-alarm rate is bounded for each kind of clean image (the reported FPR pools them).
    ``headroom`` (instead of an ROC criterion): each threshold is the
    :func:`clean_anchored_threshold` of its own clean scores, so that an attack must bring both
    scores into the clean range, not just under the gap to the patches at hand.
    """
    clean = _as_scores(clean_scores, "clean_scores")
    patched = _as_scores(patched_scores, "patched_scores")
    clean2 = _as_scores(clean_second, "clean_second")
    patched2 = _as_scores(patched_second, "patched_second")
    if clean.size != clean2.size or patched.size != patched2.size:
        raise InputError("both scores must be given for the same clean and patched images")
    _check_criterion(target_fpr, headroom)
    if headroom is not None:
        return _anchored_union(clean, patched, clean2, patched2, headroom)
    for name, rate in (("target_fpr", target_fpr), ("second_fpr", second_fpr)):
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise InputError(f"{name}={rate} must lie in [0, 1]")
    kinds = negative_kind_labels(negative_kinds, clean.size)
    kind_masks = [kinds == kind for kind in np.unique(kinds)] if kinds is not None and target_fpr is not None else []
    first_candidates = _candidate_thresholds(np.r_[clean, patched])
    second_candidates = _candidate_thresholds(np.r_[clean2, patched2])
    if second_fpr is not None:
        alone = (clean2[None, :] > second_candidates[:, None]).mean(1)
        second_candidates = second_candidates[alone <= second_fpr]
    fpr = np.empty((first_candidates.size, second_candidates.size))
    bounded = np.empty_like(fpr)  # what target_fpr bounds: the pooled FPR, or the highest of the kinds' own
    tpr = np.empty_like(fpr)
    clean_second_flags = clean2[None, :] > second_candidates[:, None]  # (second candidates, images)
    patched_second_flags = patched2[None, :] > second_candidates[:, None]
    for i, threshold in enumerate(first_candidates):  # one row at a time: memory grows with candidates x images only
        false_alarms = clean_second_flags | (clean > threshold)[None, :]
        fpr[i] = false_alarms.mean(1)
        bounded[i] = np.max([false_alarms[:, kind].mean(1) for kind in kind_masks], axis=0) if len(kind_masks) > 1 else fpr[i]
        tpr[i] = (patched_second_flags | (patched > threshold)[None, :]).mean(1)
    objective = tpr - fpr if target_fpr is None else np.where(bounded <= target_fpr, tpr, -np.inf)
    # Among equally good pairs, keep both kinds of evidence working: the most patched images each
    # score flags on its own, then the fewest clean ones, then the higher thresholds. (Otherwise,
    # when one score separates perfectly, "never flag" would do for the other.)
    own_tpr = (patched[None, :] > first_candidates[:, None]).mean(1)[:, None] + patched_second_flags.mean(1)[None, :]
    own_fpr = (clean[None, :] > first_candidates[:, None]).mean(1)[:, None] + clean_second_flags.mean(1)[None, :]
    rows, cols = np.indices(objective.shape)
    keys = (cols, rows, -own_fpr, own_tpr, -fpr, objective)  # np.lexsort: the last key is the primary one
    i, j = np.unravel_index(np.lexsort(tuple(np.broadcast_to(k, objective.shape).ravel() for k in keys))[-1], objective.shape)
    first_threshold, second_threshold = float(first_candidates[i]), float(second_candidates[j])
    criterion = "joint youden" if target_fpr is None else f"joint fpr<={target_fpr}" + (" per negative kind" if len(kind_masks) > 1 else "")
    return _union_operating_point(clean, patched, clean2, patched2, first_threshold, second_threshold, criterion)


def _anchored_union(clean: np.ndarray, patched: np.ndarray, clean2: np.ndarray, patched2: np.ndarray,
                    headroom: float) -> tuple[Calibration, Calibration, Calibration]:
    """:func:`calibrate_union` with clean-anchored thresholds (same return value)."""
    return _union_operating_point(clean, patched, clean2, patched2, clean_anchored_threshold(clean, headroom),
                                  clean_anchored_threshold(clean2, headroom), _anchored_criterion(headroom))


def union_score(first, second, first_threshold: float, second_threshold: float):
    """One number per image for the flag ``first > t1 or second > t2``: the larger margin, each
    score's excess over its threshold divided by the threshold's magnitude (floored at 1e-6), so
    that it is above 0 exactly when the flag is up and lower is "more like a clean image".
    Works on arrays and tensors (differentiable), elementwise."""
    first_scale = max(abs(first_threshold), 1e-6)
    second_scale = max(abs(second_threshold), 1e-6)
    margins = ((first - first_threshold) / first_scale, (second - second_threshold) / second_scale)
    if isinstance(first, torch.Tensor):
        return torch.maximum(*margins)
    return np.maximum(*margins)
