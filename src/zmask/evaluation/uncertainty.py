"""Bootstrap confidence intervals over images for the numbers of an evaluation.

Every interval of a report is computed on the same resampled image sets (paired bootstrap): one
draw of ``resamples`` multisets of the evaluated images, on which each statistic (AUC, TPR, FPR,
mask IoU, the task metric, the recovery of the lost metric) is recomputed, then the percentile
interval. Patched and clean scores of an image stay paired, as the settings place their patches
on the same images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..contracts import ResamplableMetric
from ..core.calibration import roc_auc
from ..errors import ConfigError
from .runner import DefenseMetrics

MAX_RESAMPLES = 100_000


@dataclass(frozen=True)
class BootstrapConfig:
    """``resamples`` multisets of the images (0: no intervals), ``confidence`` of the percentile
    interval, ``seed`` of the draw."""

    resamples: int = 500
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or not 0 <= self.resamples <= MAX_RESAMPLES:
            raise ConfigError(f"bootstrap resamples={self.resamples!r} must be an integer from 0 to {MAX_RESAMPLES}")
        if not isinstance(self.confidence, (int, float)) or not 0 < self.confidence < 1:
            raise ConfigError(f"bootstrap confidence={self.confidence!r} must lie strictly between 0 and 1")


def percentile_interval(values: Sequence[float], confidence: float) -> list[float] | None:
    """[low, high] percentiles of the finite ``values`` (None when fewer than two are finite)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size < 2:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return [float(low), float(high)]


def recovery(defended: float, attacked: float, clean: float) -> float:
    """Share of the metric lost to the patch that the defense recovers: (defended - attacked) / (clean - attacked)."""
    lost = clean - attacked
    return (defended - attacked) / lost if lost > 0 else float("nan")


class Bootstrap:
    """One draw of resampled image sets over the images ``keys`` and the intervals computed on it."""

    def __init__(self, keys: Sequence[int], config: BootstrapConfig) -> None:
        self.keys = np.asarray(sorted(keys), dtype=np.int64)
        self.config = config
        generator = np.random.default_rng(config.seed)
        self.draws = generator.integers(0, len(self.keys), size=(config.resamples, len(self.keys))) if len(self.keys) else np.zeros((0, 0), np.int64)
        self._metric_cache: dict[int, list[dict] | None] = {}

    @property
    def enabled(self) -> bool:
        return self.config.resamples > 0 and len(self.keys) > 1

    def covers(self, metrics: DefenseMetrics) -> bool:
        """Whether the per-image lists of ``metrics`` are over exactly this bootstrap's images."""
        return len(metrics.indices) == len(self.keys) and np.array_equal(np.asarray(metrics.indices), self.keys)

    def interval(self, statistic: Callable[[np.ndarray], float]) -> list[float] | None:
        """Interval of ``statistic(positions)`` (positions into the sorted images) over the resamples."""
        if not self.enabled:
            return None
        return percentile_interval([statistic(draw) for draw in self.draws], self.config.confidence)

    def mean_interval(self, values: Sequence[float]) -> list[float] | None:
        """Interval of the mean of a per-image list (flag rates, mask IoU)."""
        array = np.asarray(values, dtype=float)
        if not self.enabled or array.size != len(self.keys):
            return None
        return percentile_interval(array[self.draws].mean(1).tolist(), self.config.confidence)

    def auc_interval(self, clean: Sequence[float], patched: Sequence[float]) -> list[float] | None:
        """Interval of the clean-vs-patched ROC AUC, the two score lists resampled by the same images."""
        clean_array, patched_array = np.asarray(clean, dtype=float), np.asarray(patched, dtype=float)
        if clean_array.size != len(self.keys) or patched_array.size != len(self.keys):
            return None
        return self.interval(lambda draw: roc_auc(clean_array[draw], patched_array[draw]))

    def metric_draws(self, metrics: DefenseMetrics) -> list[dict] | None:
        """The task metric on every resample (computed once per ``metrics``), or None when the task's
        metric cannot be resampled (:class:`~zmask.contracts.ResamplableMetric`)."""
        key = id(metrics)
        if key not in self._metric_cache:
            values = None
            if self.enabled and isinstance(metrics.metric, ResamplableMetric):
                resampler = metrics.metric.resampler()
                if np.array_equal(np.asarray(resampler.keys), self.keys):
                    values = [resampler.compute(self.keys[draw].tolist()) for draw in self.draws]
            self._metric_cache[key] = values
        return self._metric_cache[key]

    def metric_interval(self, metrics: DefenseMetrics, name: str) -> list[float] | None:
        draws = self.metric_draws(metrics)
        return percentile_interval([d[name] for d in draws], self.config.confidence) if draws else None

    def recovery_interval(self, defended: DefenseMetrics, attacked: DefenseMetrics, clean: DefenseMetrics, name: str) -> list[float] | None:
        """Interval of :func:`recovery` with the three metrics taken on the same resampled images."""
        draws = [self.metric_draws(m) for m in (defended, attacked, clean)]
        if any(d is None for d in draws):
            return None
        values = [recovery(d[name], a[name], c[name]) for d, a, c in zip(*draws)]
        return percentile_interval(values, self.config.confidence)

    def gap_interval(self, first: DefenseMetrics, second: DefenseMetrics, name: str) -> list[float] | None:
        """Interval of ``first[name] - second[name]`` with both metrics taken on the same resampled images."""
        draws = [self.metric_draws(m) for m in (first, second)]
        if any(d is None for d in draws):
            return None
        return percentile_interval([a[name] - b[name] for a, b in zip(*draws)], self.config.confidence)
