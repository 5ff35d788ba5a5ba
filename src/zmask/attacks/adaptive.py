"""Defense-aware objectives (Eq. 6 and beyond): what an attack that knows Z-Mask minimises besides
the task loss.

Each objective is registered in :data:`ADAPTIVE_OBJECTIVES` under the name that
``AttackConfig.defense_attack`` (and ``zmask attack --defense-attack``) selects, and is weighted
with ``1 - alpha`` against the undefended task loss (weight ``alpha``). Adding an attack is one
function here or in a file of its own, decorated with ``@ADAPTIVE_OBJECTIVES.register("name")``.

* ``mask`` / ``flag``: the paper's Mask-Attack and Flag-Attack (Eq. 6).
* ``end_to_end``: the task loss of the *defended* output - the batch masked by the defense's own
  keep-mask and processed again - with straight-through estimates of the two hard decisions
  (the soft-mask threshold and the flag), so that the gradient reaches the patch through the whole
  pipeline (BPDA-style). With EOT from the attack's placement settings.
* ``suppress``: activation suppression - push the mean of H_S and H_D inside the patch down while
  the task loss stays high (a heatmap-level objective, unlike Eq. 5's Z-score sum L_OZ).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..contracts import AdaptiveObjective, AttackContext
from ..core.analysis import flag
from ..core.masking import apply_mask, straight_through_keep_mask
from ..core.statistics import resize_nearest
from ..errors import InputError, NotFittedError
from ..registry import Registry

ADAPTIVE_OBJECTIVES: Registry[AdaptiveObjective] = Registry("defense-aware attack objective")


@ADAPTIVE_OBJECTIVES.register("mask")
def mask_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """Mask-Attack: make the soft mask miss the patch (maximise the fusion block's pixel BCE)."""
    target = (resize_nearest(context.patch_masks, context.defense.config.heatmap_size) > 0.5).float()
    return {"mask_bce": -F.binary_cross_entropy(context.analysis.soft_mask, target)}


@ADAPTIVE_OBJECTIVES.register("flag")
def flag_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """Flag-Attack: keep the score under lambda0 (maximise the BCE of sigmoid(d - lambda0) against "patched")."""
    threshold = context.defense.state.threshold
    if threshold is None:
        raise NotFittedError("the Flag-Attack needs the defense's threshold lambda0: calibrate it first")
    flagged = torch.sigmoid(context.analysis.score - threshold)
    return {"flag_bce": -F.binary_cross_entropy(flagged, torch.ones_like(flagged))}


@ADAPTIVE_OBJECTIVES.register("end_to_end")
def end_to_end_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """The task loss after the defense: mask the batch with the straight-through keep-mask, process
    it again, and take the task's attack terms on that output (their weighted sum, to minimise)."""
    defense, state = context.defense, context.defense.state
    analysis = context.analysis
    if state.threshold is not None:  # the attack sees the ungated analysis: take the defense's own decision
        flagged = flag(analysis.score, state.threshold, analysis.extreme_score, state.extreme_threshold)
        analysis = dataclasses.replace(analysis, flagged=flagged)
    keep = straight_through_keep_mask(analysis, state.threshold, extreme_threshold=state.extreme_threshold)
    masked = apply_mask(context.images, keep, defense.config.fill_value)
    output = context.task.forward(masked)
    terms = context.task.attack_terms(output, context.batch, masked, context.patch_masks, 1.0, context.objective)
    total = sum(weight * value for weight, value in terms.values())
    if not isinstance(total, torch.Tensor):
        raise InputError(f"the {context.task.name} task gave no attack terms for objective {context.objective!r}")
    return {"defended_task": total}


@ADAPTIVE_OBJECTIVES.register("suppress")
def suppression_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """Activation suppression: the mean of H_S and of H_D over the patch's pixels (heatmap grid)."""
    heatmaps = context.analysis.heatmaps
    inside = (resize_nearest(context.patch_masks, (int(heatmaps.shallow.shape[-2]), int(heatmaps.shallow.shape[-1]))) > 0.5).float()
    area = inside.flatten(1).sum(1).clamp(min=1.0)
    shallow = (heatmaps.shallow * inside).flatten(1).sum(1) / area
    deep = (heatmaps.deep * inside).flatten(1).sum(1) / area
    terms = {"heatmaps_inside_patch": (shallow + deep).mean()}
    if context.analysis.extreme_score is not None:  # against the hardened defense: its second score too
        terms["extreme_score"] = context.analysis.extreme_score.mean()
    return terms
