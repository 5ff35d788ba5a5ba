"""What the defense costs next to the model's forward pass, and the cost-aware choice of the heatmap grid.

The analysis of a clean frame costs roughly the channels of the analysed layers times the cells of
the heatmap grid times the kernels; the network's forward pass does not shrink with it. A
detector's cheap forward pass at 640x640 with a 320x320 grid costs three times the forward. The
cost-aware fit (``FitPlan.max_overhead``, ``zmask fit --max-overhead``) measures the defended clean
frame against the forward pass on this machine for a few grids (the configured one, then halved),
takes the finest grid within the budget, and reports the separability and localisation evidence of
the analysed layers at the configured grid and at the chosen one: what the budget gave up.

Timings come from interleaved runs (:func:`interleaved_times`), so that every compared function sees
the same machine load; the ratio is what is compared, never an absolute time. ``zmask bench``
reports medians; the fit's choice takes each function's fastest run, the least disturbed by others.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ZMaskConfig
from ..defense import ZMask
from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: The coarsest heatmap side the cost-aware fit tries (cells; kernels stay at least 1x1).
MIN_HEATMAP_SIDE = 16


def interleaved_times(functions: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Seconds of each run of each function, run one after the other ``repeats`` times (after one warm-up each)."""
    times: list[list[float]] = [[] for _ in functions]
    for function in functions:  # warm-up: plans, buffers, allocator
        function()
    for _ in range(max(1, repeats)):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            times[index].append(time.perf_counter() - start)
    return times


def interleaved_medians(functions: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each function over interleaved runs (:func:`interleaved_times`): what ``zmask bench`` reports."""
    return [statistics.median(values) for values in interleaved_times(functions, repeats)]


def heatmap_candidates(heatmap_size: tuple[int, int], count: int = 4, minimum: int = MIN_HEATMAP_SIDE) -> list[tuple[int, int]]:
    """The configured grid, then halved while both sides stay at least ``minimum`` (at most ``count``)."""
    height, width = heatmap_size
    grids = [(height, width)]
    while len(grids) < count and height // 2 >= minimum and width // 2 >= minimum:
        height, width = height // 2, width // 2
        grids.append((height, width))
    return grids


@dataclass(frozen=True)
class GridCost:
    """One heatmap grid: the forward pass and the defended clean frame (analysis included), in ms."""

    heatmap_size: tuple[int, int]
    forward_ms: float
    defended_clean_ms: float

    @property
    def clean_over_forward(self) -> float:
        return self.defended_clean_ms / self.forward_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "heatmap_size": list(self.heatmap_size), "clean_over_forward": round(self.clean_over_forward, 3)}


@dataclass
class CostChoice:
    """The cost-aware choice: the budget, the measured grids, the chosen one, and the evidence
    (layer -> grid "HxW" -> {"auc", "localisation"}) at the configured and the chosen grid."""

    max_overhead: float
    threads: int
    grids: list[GridCost]
    chosen: tuple[int, int]
    within_budget: bool
    evidence: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"max_overhead": self.max_overhead, "threads": self.threads, "grids": [g.to_dict() for g in self.grids],
                "chosen": list(self.chosen), "within_budget": self.within_budget, "evidence": self.evidence}


def never_flag(state: Any) -> None:
    """Thresholds no score passes, so that every frame takes the clean path (the analysis alone):
    how the defended clean frame is timed."""
    state.threshold = float("inf")
    if state.extreme_threshold is not None:
        state.extreme_threshold = float("inf")


def measure_grids(model: nn.Module, configs: Sequence[ZMaskConfig], image: torch.Tensor, repeats: int = 9) -> list[GridCost]:
    """Forward pass and defended clean frame of ``image`` (1 x 3 x H x W) for each configuration,
    interleaved in one run; each the fastest of its runs, the figure least disturbed by other work on
    a shared machine (a choice made once, at fit time, should not depend on the load of the moment).
    Statistics come from ``image`` itself: the cost does not depend on them."""
    defenses = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for config in configs:
                defense = ZMask(model, config)
                defense.fit_statistics([image])
                never_flag(defense.state)
                defenses.append(defense)
            times = interleaved_times([lambda: model(image), *[lambda d=d: d(image) for d in defenses]], repeats)
    finally:
        model.train(was_training)
    fastest = [min(values) for values in times]
    return [GridCost(config.heatmap_size, fastest[0] * 1e3, seconds * 1e3) for config, seconds in zip(configs, fastest[1:])]


def choose_heatmap(model: nn.Module, config: ZMaskConfig, image: torch.Tensor, max_overhead: float,
                   candidates: Sequence[tuple[int, int]] | None = None, repeats: int = 9) -> CostChoice:
    """The finest of ``candidates`` (default :func:`heatmap_candidates` of the configured grid) whose
    defended clean frame costs at most ``1 + max_overhead`` forward passes on this machine; the
    cheapest one, with a warning, when none does."""
    if not max_overhead > 0:
        raise ConfigError(f"max_overhead={max_overhead} must be positive (0.25: the defended clean frame within 1.25x the forward)")
    grids = list(dict.fromkeys((int(c[0]), int(c[1])) for c in (candidates or heatmap_candidates(config.heatmap_size))))
    configs = [config.at_heatmap(grid) for grid in grids]
    costs = measure_grids(model, configs, image, repeats)
    fitting = [cost for cost in costs if cost.clean_over_forward <= 1.0 + max_overhead]
    if fitting:
        chosen, within = max(fitting, key=lambda c: c.heatmap_size[0] * c.heatmap_size[1]), True
    else:
        chosen, within = min(costs, key=lambda c: c.clean_over_forward), False
        logger.warning("no heatmap grid keeps the defended clean frame within %.2fx the forward on this machine (%s); taking the "
                       "cheapest, %s", 1 + max_overhead, ", ".join(f"{c.heatmap_size}: {c.clean_over_forward:.2f}x" for c in costs),
                       chosen.heatmap_size)
    logger.info("heatmap grid %s: defended clean frame %.2fx the forward (%d threads)", chosen.heatmap_size, chosen.clean_over_forward,
                torch.get_num_threads())
    return CostChoice(max_overhead, torch.get_num_threads(), costs, chosen.heatmap_size, within)
