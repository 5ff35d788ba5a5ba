"""Physically-realizable patch attacks: placement with EOT, optimisation, activation- and defense-aware variants."""

from .losses import over_activation_loss, segmentation_untargeted_terms
from .optimize import AttackConfig, AttackResult, PatchAttack
from .patch_io import load_patch, random_noise_patch, save_patch
from .placement import EOTConfig, PatchedBatch, apply_patch
from .sizes import patch_size

__all__ = [
    "AttackConfig", "AttackResult", "EOTConfig", "PatchAttack", "PatchedBatch", "apply_patch", "load_patch",
    "over_activation_loss", "patch_size", "random_noise_patch", "save_patch", "segmentation_untargeted_terms",
]
