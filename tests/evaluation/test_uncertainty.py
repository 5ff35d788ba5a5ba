"""Bootstrap intervals over images: resampled metrics equal the plain ones on the identity draw,
repeats count, intervals are seeded, paired and cover the point estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zmask.errors import ConfigError, InputError
from zmask.evaluation.runner import DefenseMetrics
from zmask.core.calibration import roc_auc
from zmask.evaluation.uncertainty import Bootstrap, BootstrapConfig, percentile_interval, recovery
from zmask.tasks import ConfusionMatrix, CocoEvaluator


def _segmentation_metric(images: int, seed: int = 0) -> ConfusionMatrix:
    generator = torch.Generator().manual_seed(seed)
    matrix = ConfusionMatrix(num_classes=3, ignore_index=255)
    for start in range(0, images, 2):
        keys = list(range(start, min(start + 2, images)))
        label = torch.randint(0, 3, (len(keys), 6, 8), generator=generator)
        noise = torch.randint(0, 3, label.shape, generator=generator)
        prediction = torch.where(torch.rand(label.shape, generator=generator) < 0.7, label, noise)
        matrix.update(prediction, label, keys=keys)
    return matrix


def test_confusion_matrix_resampler_matches_compute_and_counts_repeats():
    matrix = _segmentation_metric(6)
    resampler = matrix.resampler()
    assert resampler.keys == list(range(6))
    assert resampler.compute(resampler.keys)["miou"] == pytest.approx(matrix.compute()["miou"], abs=1e-12)
    twice = ConfusionMatrix(num_classes=3)
    twice.counts = 2 * matrix.per_image[0] + matrix.per_image[1]
    assert resampler.compute([0, 0, 1])["miou"] == pytest.approx(twice.compute()["miou"], abs=1e-12)
    with pytest.raises(InputError, match="not evaluated"):
        resampler.compute([7])
    plain = ConfusionMatrix(num_classes=3)
    plain.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="keys="):
        plain.resampler()


def test_coco_resampler_matches_cocoeval(assets):
    from zmask.data import CocoDetection

    annotation_file = assets / "coco_tiny" / "annotations" / "instances_val2017.json"
    dataset = CocoDetection(assets / "coco_tiny" / "val2017", annotation_file, limit=6)
    evaluator = CocoEvaluator(annotation_file)
    generator = torch.Generator().manual_seed(0)
    for index in range(len(dataset)):
        record = dataset.records[index]
        boxes, labels = [], []
        for annotation in dataset._annotations[record["id"]]:
            x, y, w, h = annotation["bbox"]
            jitter = torch.randn(4, generator=generator) * 0.15 * max(w, h)
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            labels.append(annotation["category_id"])
        scores = torch.rand(len(boxes), generator=generator)
        evaluator.update([record["id"]], [{"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": scores, "labels": torch.tensor(labels)}], keys=[index])
    full = evaluator.compute()
    resampler = evaluator.resampler()
    assert resampler.keys == list(range(len(dataset)))
    same = resampler.compute(resampler.keys)
    for name in ("map", "ap50", "ap75"):
        assert same[name] == pytest.approx(full[name], abs=1e-9), name
    assert 0.0 < full["map"] < 1.0
    # a multiset is scored as if its images had been evaluated that many times
    subset = CocoEvaluator(annotation_file)
    for index in (0, 1):
        subset.records += [r for r in evaluator.records if r["image_id"] == dataset.records[index]["id"]]
        subset.image_ids.append(dataset.records[index]["id"])
    assert resampler.compute([0, 1])["map"] == pytest.approx(subset.compute()["map"], abs=1e-9)


def _metrics(indices, scores, flagged) -> DefenseMetrics:
    return DefenseMetrics(scores=list(scores), flagged=list(flagged), indices=list(indices))


def test_bootstrap_intervals_are_seeded_paired_and_cover_the_estimate():
    rng = np.random.default_rng(1)
    clean, patched = rng.normal(0, 1, 60), rng.normal(1.5, 1, 60)
    boot = Bootstrap(range(60), BootstrapConfig(resamples=300, seed=4))
    again = Bootstrap(range(60), BootstrapConfig(resamples=300, seed=4))
    other = Bootstrap(range(60), BootstrapConfig(resamples=300, seed=5))
    interval = boot.auc_interval(clean, patched)
    assert interval == again.auc_interval(clean, patched) != other.auc_interval(clean, patched)
    assert interval[0] < roc_auc(clean, patched) < interval[1] and interval[1] <= 1.0
    flags = (rng.random(60) < 0.3).tolist()
    low, high = boot.mean_interval(flags)
    assert low < np.mean(flags) < high
    wide = Bootstrap(range(15), BootstrapConfig(resamples=300, seed=4)).mean_interval(flags[:15])
    assert wide[1] - wide[0] > high - low  # fewer images, wider interval
    assert Bootstrap(range(60), BootstrapConfig(resamples=200)).auc_interval(np.zeros(60), np.ones(60)) == [1.0, 1.0]
    assert boot.covers(_metrics(range(60), clean, flags)) and not boot.covers(_metrics(range(59), clean[:59], flags[:59]))
    assert Bootstrap(range(60), BootstrapConfig(resamples=0)).mean_interval(flags) is None


def test_recovery_interval_uses_the_same_images_for_all_three_metrics():
    boot = Bootstrap(range(8), BootstrapConfig(resamples=100, seed=0))
    clean, attacked, defended = (DefenseMetrics(indices=list(range(8)), metric=_segmentation_metric(8, seed)) for seed in (0, 0, 0))
    # identical metrics: nothing was lost, the recovery is undefined on every resample
    assert boot.recovery_interval(defended, attacked, clean, "miou") is None
    worse = DefenseMetrics(indices=list(range(8)), metric=_segmentation_metric(8, seed=3))
    interval = boot.recovery_interval(clean, worse, clean, "miou")
    assert interval == [1.0, 1.0]  # defended == clean on every resample: full recovery
    assert recovery(0.5, 0.2, 0.6) == pytest.approx(0.75) and np.isnan(recovery(0.5, 0.6, 0.6))


def test_bootstrap_config_and_interval_errors():
    with pytest.raises(ConfigError, match="resamples"):
        BootstrapConfig(resamples=-1)
    with pytest.raises(ConfigError, match="confidence"):
        BootstrapConfig(confidence=1.0)
    assert percentile_interval([float("nan"), 1.0], 0.95) is None
    assert percentile_interval([0.0, 1.0, 2.0], 0.5) == [0.5, 1.5]
