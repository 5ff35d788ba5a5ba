"""Choosing the detection threshold lambda0 by ROC analysis of clean vs patched scores."""

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


def calibrate_threshold(clean_scores, patched_scores, target_fpr: float | None = None) -> Calibration:
    """lambda0 such that ``score > lambda0`` flags an attack.

    Default criterion: Youden's J (max TPR - FPR). With ``target_fpr``, the operating point with
    the highest TPR whose FPR does not exceed it. The threshold is placed halfway between the
    lowest flagged score and the next lower score, so the strict comparison reproduces the point.
    """
    from sklearn.metrics import roc_curve

    clean = _as_scores(clean_scores, "clean_scores")
    patched = _as_scores(patched_scores, "patched_scores")
    if target_fpr is not None and not 0.0 <= target_fpr <= 1.0:
        raise InputError(f"target_fpr={target_fpr} must lie in [0, 1]")
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
    flagged_clean = float((clean > threshold).mean())
    flagged_patched = float((patched > threshold).mean())
    return Calibration(threshold, flagged_patched, flagged_clean, roc_auc(clean, patched), criterion)
