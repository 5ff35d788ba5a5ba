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
* ``suppress_all``: ``suppress`` and, against layered evidence, the channel extremes as well: the
  extreme score and every channel's excess over its clean maximum inside the patch.
* ``flag_evasion``: stay under the defense's whole flag - a smooth hinge on the flag margin
  (:func:`zmask.core.analysis.flag_margin`), which covers both scores of a layered defense.
* ``decoy``: mislead the choice of the keep-mask - move the soft mask's and the coverage's peak
  out of the patch (heat outside up, inside down), so that the candidates mask a decoy.

``end_to_end`` follows the defense wherever it goes: against a defense that chooses its keep-mask
among candidates (``ZMaskConfig.mask_candidates``) the choice is made as the defense makes it,
without gradients, and the gradient flows through the chosen re-pass (BPDA through the selection).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..contracts import AdaptiveObjective, AttackContext
from ..core.analysis import Analysis, flag
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
    """The task loss after the defense: mask the batch with the defense's keep-mask (straight-through
    estimates of the soft-mask threshold and the flag; the candidate the defense would choose, where
    it chooses), process it again, and take the task's attack terms on that output (their weighted
    sum, to minimise)."""
    defense, state = context.defense, context.defense.state
    analysis = context.analysis
    if state.threshold is not None:  # the attack sees the ungated analysis: take the defense's own decision
        flagged = flag(analysis.score, state.threshold, analysis.extreme_score, state.extreme_threshold)
        analysis = dataclasses.replace(analysis, flagged=flagged)
    if defense.config.mask_candidates:
        keep = _chosen_keep_mask(context, analysis)
    else:
        keep = straight_through_keep_mask(analysis, state.threshold, extreme_threshold=state.extreme_threshold)
    masked = apply_mask(context.images, keep, defense.config.fill_value)
    output = context.task.forward(masked)
    terms = context.task.attack_terms(output, context.batch, masked, context.patch_masks, 1.0, context.objective)
    total = sum(weight * value for weight, value in terms.values())
    if not isinstance(total, torch.Tensor):
        raise InputError(f"the {context.task.name} task gave no attack terms for objective {context.objective!r}")
    return {"defended_task": total}


def _chosen_keep_mask(context: AttackContext, analysis: Analysis) -> torch.Tensor:
    """The keep-mask the defense's candidate choice gives each image (found without gradients: the
    choice is a constant of the backward pass), gated by a straight-through flag whose gradient is
    that of sigmoid(flag margin)."""
    with torch.no_grad():
        chosen = context.defense(context.images.detach()).detection.keep_mask
    margin = analysis.margin
    if margin is None:
        raise NotFittedError("the end-to-end attack on a defense that chooses among keep-masks needs lambda0: calibrate it first")
    probability = torch.sigmoid(margin)
    gate = analysis.flagged.float() + (probability - probability.detach())
    return 1.0 - (1.0 - chosen.to(context.images)) * gate.view(-1, 1, 1, 1)


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


@ADAPTIVE_OBJECTIVES.register("suppress_all")
def suppress_all_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """``suppress`` plus the channel extremes of a layered defense: its extreme score, and the
    excess of every channel over its clean maximum inside the patch (:func:`_extremes_inside_patch`)."""
    terms = suppression_attack(context)
    if context.defense.state.extremes:
        terms["extremes_inside_patch"] = _extremes_inside_patch(context)
    return terms


def _extremes_inside_patch(context: AttackContext) -> torch.Tensor:
    """Mean over images of the summed excess, in clean standard deviations, of every channel over
    its clean maximum, averaged over the patch's pixels (the layered defense's coverage evidence)."""
    excess = []
    for name, stats in (context.defense.state.extremes or {}).items():
        activation = context.activations[name].float()
        inside = resize_nearest(context.patch_masks, (int(activation.shape[-2]), int(activation.shape[-1]))) > 0.5
        over = ((activation - stats.upper.to(activation).view(1, -1, 1, 1)) / stats.std.to(activation).view(1, -1, 1, 1)).clamp(min=0)
        excess.append((over * inside).sum((1, 2, 3)) / inside.flatten(1).sum(1).clamp(min=1))
    return torch.stack(excess).sum(0).mean()


@ADAPTIVE_OBJECTIVES.register("flag_evasion")
def flag_evasion_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """Stay under the whole flag: softplus of the flag margin (Z-Mask score and, on a layered
    defense, the extreme score, each relative to its threshold), sharpened by 10."""
    margin = context.analysis.margin
    if margin is None:
        raise NotFittedError("the flag-evasion attack needs the defense's threshold lambda0: calibrate it first")
    return {"flag_margin": (F.softplus(10.0 * margin) / 10.0).mean()}


@ADAPTIVE_OBJECTIVES.register("decoy")
def decoy_attack(context: AttackContext) -> dict[str, torch.Tensor]:
    """Mislead the keep-mask: the soft mask's mean inside the patch minus its peak outside, so that
    Eq. 4's mask and the windows centred on its peak land beside the patch; on a layered defense
    also the channel excess inside the patch (the coverage regions) pushed down."""
    soft = context.analysis.soft_mask
    inside = (resize_nearest(context.patch_masks, (int(soft.shape[-2]), int(soft.shape[-1]))) > 0.5).float()
    mean_inside = (soft * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1.0)
    peak_outside = (soft * (1.0 - inside)).flatten(1).amax(1)
    terms = {"decoy_soft_mask": (mean_inside - peak_outside).mean()}
    if context.defense.state.extremes:
        terms["extremes_inside_patch"] = _extremes_inside_patch(context)
    return terms
