"""Physically-realizable patch attacks: placement with EOT, optimisation, activation- and defense-aware variants."""

from .adaptive import ADAPTIVE_OBJECTIVES, flag_attack, mask_attack
from .losses import over_activation_loss
from .optimize import AttackConfig, AttackResult, PatchAttack
from .patch_io import load_patch, random_noise_patch, save_patch
from .physical import PhysicalConditions
from .placement import EOTConfig, PatchedBatch, apply_patch
from .sizes import patch_size

__all__ = [
    "ADAPTIVE_OBJECTIVES", "AttackConfig", "AttackResult", "EOTConfig", "PatchAttack", "PatchedBatch", "PhysicalConditions", "apply_patch", "flag_attack",
    "load_patch", "mask_attack", "over_activation_loss", "patch_size", "random_noise_patch", "save_patch",
]
