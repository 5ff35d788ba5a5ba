"""Defense-aware objectives (Eq. 6): what an attack that knows Z-Mask minimises besides the task loss.

Each objective is registered in :data:`ADAPTIVE_OBJECTIVES` under the name that
``AttackConfig.defense_attack`` (and ``zmask attack --defense-attack``) selects; adding an attack
is one function here or in a file of its own, decorated with ``@ADAPTIVE_OBJECTIVES.register("name")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contracts import AdaptiveObjective, AttackContext
from ..core.statistics import resize_nearest
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
    flag = torch.sigmoid(context.analysis.score - context.defense.threshold)
    return {"flag_bce": -F.binary_cross_entropy(flag, torch.ones_like(flag))}
