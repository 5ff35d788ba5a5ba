"""Patch optimisation (Eq. 1), activation-aware (Eq. 5) and defense-aware (Eq. 6) attacks.

One loop serves every attack: each step draws a batch of images, pastes the patch under EOT at
random positions, evaluates the loss terms, and takes an Adam step along a weighted sum of the
terms' *normalised* gradients with respect to the patch (spec 4.2), so that the weights (beta,
alpha, smoothness, printability) mean what they say whatever the terms' scales.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..contracts import AttackContext, FittedDefense, SizedDataset, Task, WeightedTerm
from ..core.capture import run_and_capture
from ..errors import ConfigError, ZMaskError
from .adaptive import ADAPTIVE_OBJECTIVES
from .losses import default_printable_colours, non_printability, over_activation_loss, smoothness
from .placement import EOTConfig, apply_patch

logger = logging.getLogger(__name__)

_NEEDS_DEFENSE = "activation-aware (beta < 1) and defense-aware attacks need a fitted ZMask defense"
_NEEDS_STATISTICS = "the defense has no statistics: fit or load it first"


@dataclass(frozen=True)
class AttackConfig:
    """Settings of a patch attack.

    patch_size: (height, width) in pixels. beta: Eq. 5 weight of the adversarial term (1 = plain
    attack; needs a defense for L_OZ when < 1). defense_attack: None or the name of a registered
    defense-aware objective (``ADAPTIVE_OBJECTIVES``: "mask" = Mask-Attack, "flag" = Flag-Attack),
    with weight ``alpha`` on the adversarial term (Eq. 6). objective: the task's attack objective
    (detection: "untargeted" or "vanishing"). Learning rate is in [0, 1] pixel units (Adam).
    """

    patch_size: tuple[int, int]
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 0.03
    eot: EOTConfig = field(default_factory=EOTConfig)
    beta: float = 1.0
    defense_attack: str | None = None
    alpha: float = 1.0
    objective: str = "untargeted"
    smoothness_weight: float = 0.0
    printability_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} must lie in [0, 1]")
        if self.defense_attack is not None:
            ADAPTIVE_OBJECTIVES.get(self.defense_attack)  # unknown names raise with the choices
        if min(self.patch_size) < 1 or self.steps < 0 or self.batch_size < 1 or not 0 < self.learning_rate < math.inf:
            raise ConfigError(f"invalid attack settings: patch {self.patch_size}, steps {self.steps}, batch {self.batch_size}, lr {self.learning_rate}")
        for name in ("smoothness_weight", "printability_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name}={getattr(self, name)} must be a finite number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackResult:
    """The optimised patch (3 x h x w in [0, 1]) and the mean loss terms per logged step."""

    patch: torch.Tensor
    history: list[dict[str, float]]
    config: AttackConfig


def _normalise(gradient: torch.Tensor) -> torch.Tensor:
    return gradient / gradient.norm().clamp(min=1e-12)


class PatchAttack:
    """Crafts a patch against ``task`` (a :class:`~zmask.contracts.Task`), optionally aware of a defense.

    ``data`` is an indexable dataset of the task's dict items: ``image`` (3 x H x W, all the same
    size) and the task's labels (``label`` for segmentation, ``target`` for detection, in the same
    pixel frame as ``image``).
    """

    def __init__(self, task: Task, config: AttackConfig, defense: FittedDefense | None = None) -> None:
        if config.beta < 1.0 or config.defense_attack is not None:
            if defense is None:
                raise ZMaskError(_NEEDS_DEFENSE)
            if defense.state.statistics is None:
                raise ZMaskError(_NEEDS_STATISTICS)
            if config.defense_attack is not None and defense.state.threshold is None:
                raise ZMaskError("defense-aware attacks need the defense's threshold lambda0: calibrate it first")
        if config.objective not in task.objectives:
            raise ConfigError(f"the {task.name} task has no attack objective {config.objective!r}; use one of {task.objectives}")
        self.task, self.config, self.defense = task, config, defense
        self.printable = default_printable_colours()

    def initial_patch(self, generator: torch.Generator) -> torch.Tensor:
        height, width = self.config.patch_size
        return torch.rand(3, height, width, generator=generator)

    def run(
        self,
        data: SizedDataset,
        initial: torch.Tensor | None = None,
        progress: bool = True,
        callback: Callable[[int, torch.Tensor, dict[str, float]], None] | None = None,
    ) -> AttackResult:
        """Optimise the patch; ``initial`` resumes from a saved patch. Deterministic for a seed."""
        config = self.config
        if len(data) == 0:
            raise ZMaskError("the attack needs at least one image")
        generator = torch.Generator().manual_seed(config.seed)
        patch = (initial.clone().float() if initial is not None else self.initial_patch(generator))
        if tuple(patch.shape) != (3, *config.patch_size):
            raise ZMaskError(f"the initial patch has shape {tuple(patch.shape)}, expected (3, {config.patch_size[0]}, {config.patch_size[1]})")
        device = _device_of(self.task.model)
        patch = patch.to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([patch], lr=config.learning_rate)
        history = []
        for step in tqdm(range(config.steps), desc="attack", disable=not progress):
            index = torch.randint(0, len(data), (config.batch_size,), generator=generator).tolist()
            batch = self.task.collate([data[i] for i in index])
            images = batch["image"].to(device)
            placed = apply_patch(images, patch, generator, config.eot)
            terms = self._terms(placed, batch, patch)
            direction = torch.zeros_like(patch)
            record = {}
            for name, (weight, value) in terms.items():
                record[name] = float(value.detach())
                if weight == 0 or not value.requires_grad:
                    continue
                (gradient,) = torch.autograd.grad(value, patch, retain_graph=True)
                direction += weight * _normalise(gradient)
            optimizer.zero_grad(set_to_none=True)
            patch.grad = _normalise(direction)
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
            history.append(record)
            if callback is not None:
                callback(step, patch.detach(), record)
        logger.info("patch attack: %d steps on %d images, last loss terms %s", config.steps, len(data), history[-1] if history else {})
        return AttackResult(patch.detach().cpu(), history, config)

    def _fitted_defense(self) -> FittedDefense:
        """The defense, which the settings that read it require (checked in ``__init__``)."""
        if self.defense is None:
            raise ZMaskError(_NEEDS_DEFENSE)
        return self.defense

    def _terms(self, placed, batch: dict[str, Any], patch: torch.Tensor) -> dict[str, WeightedTerm]:
        """Loss terms to *minimise*, each with its weight in the update direction."""
        config = self.config
        layers: list[str] = []
        if config.beta < 1.0:
            layers += list(self._fitted_defense().config.shallow_layers)
        if config.defense_attack is not None:
            layers += list(self._fitted_defense().config.layers)
        layers = list(dict.fromkeys(layers))
        if layers:
            output, activations = run_and_capture(self.task.model, placed.images, layers, self._fitted_defense().on_repeat)
        else:
            output, activations = self.task.forward(placed.images), {}
        adversarial_weight = config.beta * (config.alpha if config.defense_attack else 1.0)
        terms = self.task.attack_terms(output, batch, placed.images, placed.masks, adversarial_weight, config.objective)
        if config.beta < 1.0:
            defense = self._fitted_defense()
            statistics = defense.state.statistics
            if statistics is None:
                raise ZMaskError(_NEEDS_STATISTICS)
            shallow = {name: activations[name] for name in defense.config.shallow_layers}
            terms["over_activation"] = (1.0 - config.beta, over_activation_loss(
                shallow, statistics, placed.masks, defense.config.heatmap_size, defense.config.eps, defense.config.std_floor))
        if config.defense_attack is not None:
            defense = self._fitted_defense()
            analysis = defense.analyze(activations, (int(placed.images.shape[-2]), int(placed.images.shape[-1])), gate=False)
            context = AttackContext(defense, placed.images, placed.masks, output, activations, analysis, self.task, batch, config.objective)
            for name, value in ADAPTIVE_OBJECTIVES.get(config.defense_attack)(context).items():
                terms[name] = (1.0 - config.alpha, value)
        if config.smoothness_weight:
            terms["smoothness"] = (config.smoothness_weight, smoothness(patch))
        if config.printability_weight:
            terms["printability"] = (config.printability_weight, non_printability(patch, self.printable))
        return terms


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
