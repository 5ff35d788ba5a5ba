"""The contracts between zmask and the code users plug into it, as ``typing.Protocol`` classes.

Each docstring *is* the contract: shapes, value ranges and output formats. Implementations register
themselves (``zmask.models.PRESETS``, ``zmask.tasks.TASKS``, ``zmask.evaluation.DEFENSES``,
``zmask.attacks.ADAPTIVE_OBJECTIVES``) and are found by name through those registries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

if TYPE_CHECKING:
    from .config import ZMaskConfig
    from .core.analysis import Analysis
    from .core.capture import RepeatPolicy
    from .core.state import FittedState

#: A loss term of an attack: (weight in the update direction, scalar tensor to *minimise*).
WeightedTerm = tuple[float, torch.Tensor]


class SizedDataset(Protocol):
    """Items read by index: ``len(data)`` items, ``data[i]`` for ``0 <= i < len(data)`` a dict
    (``image`` and the task's labels, see :class:`Task`). A list of dicts, or a map-style
    ``torch.utils.data.Dataset`` that defines ``__len__``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


@runtime_checkable
class ModelWrapper(Protocol):
    """A model as zmask consumes it (an ``nn.Module``).

    Input: a float tensor B x 3 x H x W, RGB, values in [0, 1], on the model's device; the wrapper
    applies the model's own preprocessing (normalisation, channel order) inside ``forward``, so that
    patches, masks and fill values all live in image space. Output: the task's format -
    segmentation: logits B x K x H x W at input resolution; detection: a list of B dicts in
    torchvision's format (``boxes`` N x 4 xyxy in input pixels, ``labels`` N int64, ``scores`` N);
    classification: logits B x K. Layers are addressed by ``named_modules()`` names.
    """

    def __call__(self, images: torch.Tensor) -> Any: ...

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class AttackableDetector(ModelWrapper, Protocol):
    """A detector wrapper that offers differentiable attack objectives.

    ``objectives`` names the kinds it implements (e.g. ``("untargeted", "vanishing")``);
    ``objective(images, targets, kind)`` returns a scalar tensor that an attack *maximises*, for
    targets given as a list of B dicts with ``boxes`` (xyxy, input pixels) and ``labels``.
    """

    objectives: tuple[str, ...]

    def objective(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], kind: str = "untargeted") -> torch.Tensor: ...


class MetricAccumulator(Protocol):
    """Accumulates a task metric over batches; ``compute()`` reduces across ``torch.distributed``
    ranks and returns a dict of floats that holds at least the task's ``metric_key``."""

    def compute(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Resampler:
    """A task metric on resampled multisets of images (the bootstrap over images).

    ``keys``: the dataset indices of the images evaluated, on every rank, sorted.
    ``compute(keys)``: the metric dict that ``compute()`` would return had exactly the images
    ``keys`` been evaluated, an image listed twice counting twice.
    """

    keys: list[int]
    compute: Callable[[Sequence[int]], dict[str, Any]]


@runtime_checkable
class ResamplableMetric(Protocol):
    """A :class:`MetricAccumulator` whose metric can be recomputed on resampled images.

    Images are keyed by their index in the evaluated dataset (``Task.update_metric`` finds it in
    ``batch["index"]``, which the evaluation loop adds). ``resampler()`` gathers what it needs from
    every ``torch.distributed`` rank (call it on all of them) and returns a :class:`Resampler`. A
    task whose metric lacks it still gets intervals for its detection numbers, not for its metric.
    """

    def compute(self) -> dict[str, Any]: ...

    def resampler(self) -> Resampler: ...


#: The metric accumulator type of a task (:class:`Task` is generic in it).
MetricT = TypeVar("MetricT", bound=MetricAccumulator)


@runtime_checkable
class Task(Protocol[MetricT]):
    """What the evaluation, the attacks and the reports need to know about a task.

    Class attributes: ``name`` (registry key), ``metric_key`` (the headline metric in
    ``MetricAccumulator.compute()``, e.g. "miou", "map", "accuracy"), ``paper_patch_sizes``
    ((reference input H, W), {"S"|"M"|"L": (patch H, W)}) and ``objectives`` (attack objective names).
    Items of the task's datasets are dicts with ``image`` (3 x H x W in [0, 1]) and the task's labels.
    Generic in its metric accumulator (``Task[ConfusionMatrix]``): ``update_metric`` is given the
    accumulator that the task's own ``metric()`` made. The task of a model preset is also a
    :class:`PresetTask`.
    """

    name: ClassVar[str]
    metric_key: ClassVar[str]
    paper_patch_sizes: ClassVar[tuple[tuple[int, int], dict[str, tuple[int, int]]]]
    objectives: ClassVar[tuple[str, ...]]
    model: torch.nn.Module

    def forward(self, images: torch.Tensor) -> Any:
        """The model's output on B x 3 x H x W images in [0, 1]."""

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A batch dict from dataset items: ``image`` stacked (B x 3 x H x W) plus the labels."""

    def attack_terms(self, output: Any, batch: Mapping[str, Any], images: torch.Tensor, patch_masks: torch.Tensor,
                     weight: float, objective: str) -> dict[str, WeightedTerm]:
        """The adversarial loss of Eq. 1 as weighted terms to minimise (their weights sum to ``weight``),
        for ``output`` of the patched ``images`` (patch pixels: ``patch_masks`` B x 1 x H x W)."""

    def metric(self) -> MetricT:
        """A fresh accumulator of the task metric."""

    def update_metric(self, accumulator: MetricT, output: Any, batch: Mapping[str, Any], patch_masks: torch.Tensor) -> None:
        """Add a batch, leaving out the patch's pixels (``patch_masks``, 1 = patch) where the task can."""

    def render(self, axis: Any, image: torch.Tensor, output: Any) -> None:
        """Draw one image's prediction on a matplotlib axis (figures of the reports)."""

    def overlay(self, image: torch.Tensor, output: Any) -> torch.Tensor:
        """One image (3 x H x W in [0, 1]) with its prediction drawn on it (``output``: the model's
        output for that image as a batch of one); used for defended videos."""


class PresetTask(Task[MetricT], Protocol[MetricT]):
    """A :class:`Task` that model presets (``zmask.models.ModelPreset``) and model factories are
    built on, as the built-in segmentation and detection tasks are: the staticmethod
    ``paper_config(shallow_layers, deep_layers, input_size, heatmap_size=None, **options)`` gives
    the paper's ``ZMaskConfig`` for the task scaled to ``input_size`` (H, W), with ``heatmap_size``
    overriding the scaled heatmap and ``options`` any other ``ZMaskConfig`` field."""

    @staticmethod
    def paper_config(shallow_layers: Sequence[str], deep_layers: Sequence[str], input_size: tuple[int, int],
                     heatmap_size: tuple[int, int] | None = None, **options: Any) -> ZMaskConfig: ...


@dataclass
class DefenseResult:
    """What a defense returns for a batch.

    output: the task output (after masking, where the defense masks); score: detection score (B) or
    None; flagged: B bools or None; mask: predicted patch pixels (B x 1 x H x W, 1 = patch) or None;
    masked_images: what the model saw (B x 3 x H x W) or None when it saw the input; extra: results
    of detectors that observed the same forward pass (name -> (score, flagged)).
    """

    output: Any
    score: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    masked_images: torch.Tensor | None = None
    extra: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


class FittedDefense(Protocol):
    """A fitted Z-Mask defense as the evaluation and the attacks see it (:class:`zmask.ZMask`).

    ``model``: the wrapped model (:class:`ModelWrapper`); ``config``: its ``ZMaskConfig``;
    ``state``: its ``FittedState`` (statistics, fusion block, lambda0, ...); ``on_repeat``: how a
    layer that runs more than once per forward pass is read (``RepeatPolicy``). ``capture(images)``:
    (model output, activations of every configured layer) of one forward pass;
    ``analyze(activations, input_size, gate)``: the differentiable ``Analysis`` of those activations;
    ``detect(images)``: both at once; ``apply_mask(images, keep_mask)``: Eq. 4's masked images;
    calling it gives the defended output (``DefenseOutput``).
    """

    model: torch.nn.Module
    config: ZMaskConfig
    state: FittedState
    on_repeat: RepeatPolicy

    def capture(self, images: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]: ...

    def analyze(self, activations: dict[str, torch.Tensor], input_size: tuple[int, int], gate: bool = True,
                per_layer: bool = False) -> Analysis: ...

    def detect(self, images: torch.Tensor, gate: bool = True, per_layer: bool = False) -> Analysis: ...

    def apply_mask(self, images: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, images: torch.Tensor, gate: bool = True, return_heatmaps: bool = False) -> Any: ...


@dataclass
class FitContext:
    """What a defense may fit itself on: the model, the fitted Z-Mask, the training split, the
    adversarial training patches, and (images, patch_masks) batches of those patches placed at
    random on training images (half of them clean)."""

    model: torch.nn.Module
    zmask: FittedDefense  # the fitted zmask.ZMask
    train: Any
    patches: Sequence[torch.Tensor]
    clean_batches: list[torch.Tensor]
    labelled_batches: list[tuple[torch.Tensor, torch.Tensor]]
    seed: int = 0
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Defense(Protocol):
    """A defense under evaluation (Z-Mask or a baseline).

    ``name``: registry key (read from the class by ``DEFENSES.register()``) and report column (read
    from the instance; a class attribute, or one set per instance as :class:`~zmask.evaluation.ScoreDefense`
    does). ``masks``: whether it changes the task output (it gets a column of the masking table);
    ``detects``: whether it returns scores (detection tables).
    ``build(context)`` (a classmethod) fits whatever it learns on the training data and returns
    the ready defense;
    ``__call__(images)`` (B x 3 x H x W in [0, 1]) returns a :class:`DefenseResult`, without
    gradients. A defense with ``observes_undefended = True`` is a detection-only scorer
    (:class:`ObservingDefense`): instead of a forward pass of its own it provides ``layers`` and
    ``observe(activations) -> (score, flagged)``, and scores the undefended pass of the "none" defense.
    """

    @property
    def name(self) -> str: ...

    masks: ClassVar[bool]
    detects: ClassVar[bool]

    @classmethod
    def build(cls, context: FitContext) -> Defense: ...

    def __call__(self, images: torch.Tensor) -> DefenseResult: ...


@runtime_checkable
class ObservingDefense(Defense, Protocol):
    """A detection-only :class:`Defense` that scores another defense's forward pass
    (``observes_undefended = True``; HN, FPDA): ``layers`` names the layers it reads,
    ``observe(activations)`` (layer name -> activation, at least ``layers``) returns its score (B)
    and flags (B bools, or None without a threshold)."""

    observes_undefended: ClassVar[bool]

    @property
    def layers(self) -> list[str]: ...

    def observe(self, activations: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class AttackContext:
    """What an adaptive objective sees at one attack step: the defense, the patched batch
    (``images`` B x 3 x H x W, ``patch_masks`` B x 1 x H x W), the task output on it, the activations
    of every layer the defense reads, the defense's :class:`~zmask.core.analysis.Analysis`
    (ungated, differentiable heatmaps, soft mask and score), and the task with the batch's labels
    and the attack objective's name (to evaluate the task loss of a re-processed batch)."""

    defense: FittedDefense  # the zmask.ZMask under attack
    images: torch.Tensor
    patch_masks: torch.Tensor
    output: Any
    activations: dict[str, torch.Tensor]
    analysis: Analysis
    task: Task
    batch: Mapping[str, Any]
    objective: str = "untargeted"


class AdaptiveObjective(Protocol):
    """A defense-aware attack term (``zmask.attacks.ADAPTIVE_OBJECTIVES``): called with an
    :class:`AttackContext`, returns named scalar tensors to *minimise*; the attack weights their sum
    with ``1 - alpha`` against the task loss (Eq. 6)."""

    def __call__(self, context: AttackContext) -> dict[str, torch.Tensor]: ...
