"""Baselines and the experiment runner on the toy network: behaviour, reuse and reproducibility."""

from __future__ import annotations

import copy

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zmask import FusionTraining, ZMask
from zmask.attacks import PhysicalConditions
from zmask.errors import ZMaskError
from zmask.evaluation import (CoverageScore, ExperimentSpec, HyperNeuronScore, LGSDefense, MaskNet, NoDefense, ScoreDefense, ZMaskDefense,
                              build_defenses, local_gradient_smoothing, run_experiments, train_masknet)
from zmask.evaluation import experiments as experiments_module
from zmask.tasks.segmentation import SegmentationTask

from ..toy import TOY_CONFIG, ToyNet, clean_batches, patched_batch


class ToySegmenter(ToyNet):
    """The toy network with a 3-class head upsampled to the input: a segmenter with the toy's layers."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(super().forward(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def toy_setup():
    torch.manual_seed(0)
    model = ToySegmenter().eval()
    defense = ZMask(model, TOY_CONFIG, seed=0)
    defense.fit_statistics(clean_batches(6))
    clean = [(images, torch.zeros(images.shape[0], 1, *images.shape[2:])) for images in clean_batches(6, 4, seed=9)]
    defense.fit_fusion([patched_batch(4, seed=s) for s in range(6)] + clean, FusionTraining(epochs=20, batch_size=8, learning_rate=0.05))
    defense.calibrate([patched_batch(4, seed=100 + s) for s in range(3)] + [(c, torch.zeros(4, 1, 96, 128)) for c in clean_batches(3, 4, seed=50)])
    images = torch.cat(clean_batches(2, 4, seed=77))
    with torch.no_grad():
        labels = model(images).argmax(1)  # the clean prediction is the ground truth: undefended clean mIoU is 1
    dataset = [{"image": image, "label": label} for image, label in zip(images, labels)]
    generator = torch.Generator().manual_seed(5)
    patches = [(torch.rand(3, 32, 32, generator=generator) > 0.5).float() for _ in range(2)]
    return model, defense, dataset, patches


def test_lgs_masks_high_gradient_regions_only():
    smooth = torch.full((1, 3, 96, 128), 0.5)
    out, mask = local_gradient_smoothing(smooth)
    assert mask.abs().sum() == 0 and torch.equal(out, smooth)
    images, true = patched_batch(1, seed=3)
    images = images * 0 + 0.5
    images[true.expand_as(images) > 0] = patched_batch(1, seed=3)[0][true.expand_as(images) > 0]
    out, mask = local_gradient_smoothing(images)
    predicted = mask > 0
    inside = (predicted & (true > 0)).sum() / (true > 0).sum()
    outside = (predicted & (true == 0)).sum() / (true == 0).sum()
    assert inside > 0.5 and outside < 0.05
    assert (out - 0.5).abs()[true.expand_as(out) > 0].mean() < (images - 0.5).abs()[true.expand_as(images) > 0].mean()


def test_activation_scores_rank_patched_above_clean():
    torch.manual_seed(0)
    model = ToyNet().eval()
    fit_data = clean_batches(6)
    hn = HyperNeuronScore(model, "c3").fit(fit_data)
    coverage = CoverageScore(model, "c3").fit(fit_data)
    assert torch.all(coverage.score(torch.cat(fit_data)) == 0)  # nothing exceeds the maxima it was fitted on
    clean = torch.cat(clean_batches(2, 4, seed=40))
    patched, _ = patched_batch(8, seed=41)
    for scorer in (hn, coverage):
        assert scorer.score(patched).mean() > scorer.score(clean).mean()


def test_masknet_learns_the_patch_mask():
    data = [patched_batch(4, seed=s) for s in range(4)]
    history = train_masknet(MaskNet(width=8), data, epochs=6, learning_rate=3e-3, seed=0)
    assert history[-1] < 0.7 * history[0]
    again = train_masknet(MaskNet(width=8), data, epochs=6, learning_rate=3e-3, seed=0)
    assert again == history


def test_build_defenses_rejects_unknown_names(toy_setup):
    model, defense, dataset, patches = toy_setup
    with pytest.raises(ZMaskError, match="unknown defense 'fancy'"):
        build_defenses(model, defense, dataset, patches, ["zmask", "fancy"])
    with pytest.raises(ZMaskError, match="MaskNet needs"):
        build_defenses(model, defense, dataset, [], ["masknet"])
    masking, detectors = build_defenses(model, defense, dataset, patches, ["zmask", "hn", "fpda"], progress=False, batch_size=4)
    assert [d.name for d in masking] == ["zmask", "none"]  # HN and FPDA observe the undefended pass
    assert [d.name for d in detectors] == ["zmask", "hn", "fpda"]


def _run(toy_setup, output, monkeypatch=None):
    model, defense, dataset, patches = toy_setup
    calls = []
    if monkeypatch is not None:
        original = experiments_module.evaluate

        def counting(task, data, settings, *args, **kwargs):
            calls.append([s.name for s in settings])
            return original(task, data, settings, *args, **kwargs)

        monkeypatch.setattr(experiments_module, "evaluate", counting)
    hn = HyperNeuronScore(model, "c3").fit(clean_batches(4))
    masking = [ZMaskDefense(defense), LGSDefense(model), NoDefense(model, [ScoreDefense("hn", model, hn, threshold=0.5)])]
    detectors = [masking[0], masking[2].observers[0]]
    spec = ExperimentSpec("toy", {"L": patches[0]}, {0.5: patches[1], 1.0: patches[0]}, {("mask", 1.0): patches[0], ("mask", 0.0): patches[1]},
                          seed=3, batch_size=4, examples=1, physical=PhysicalConditions())
    results = run_experiments(SegmentationTask(model, 3, 255), dataset, defense, spec, masking, detectors, output, progress=False)
    return results, calls


def test_experiments_report_reuse_and_reproducibility(toy_setup, tmp_path, monkeypatch):
    results, calls = _run(toy_setup, tmp_path / "a", monkeypatch)
    assert sum(len(c) for c in calls) == 4  # no patch, patch 0, patch 0 physical, patch 1: each evaluated once
    assert results["masking"]["no patch"]["none"]["miou"] == pytest.approx(1.0)
    assert results["beta_sweep"]["1.0"]["zmask"]["miou"] == results["masking"]["L"]["zmask"]["miou"]
    assert results["alpha_sweep"]["mask alpha=1.0"]["zmask"] == results["masking"]["L"]["zmask"]
    assert set(results["detection"]["L"]) == {"zmask", "hn"} and set(results["detection"]["L physical"]) == {"zmask", "hn"}
    assert results["masking"]["L physical"]["zmask"]["mask_iou"] != results["masking"]["L"]["zmask"]["mask_iou"]
    for name in ("results.json", "summary.md", "roc.png", "beta_auc.png", "beta_metric.png", "alpha_mask.png", "examples.png"):
        assert (tmp_path / "a" / name).is_file(), name
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "## Masking" in summary and "## Defense-aware attacks" in summary
    assert "## Recovery" in summary and "## Operating point" in summary and "bootstrap intervals" in summary
    # bootstrap intervals over the images, around each point estimate
    assert results["bootstrap"]["images"] == len(toy_setup[2])
    for row in ("no patch", "L"):
        value, (low, high) = results["masking"][row]["zmask"]["miou"], results["masking"][row]["zmask"]["miou_ci"]
        assert low <= value + 1e-9 and value <= high + 1e-9
    detection = results["detection"]["L"]["zmask"]
    assert detection["auc_ci"][0] <= detection["auc"] <= detection["auc_ci"][1]
    assert set(results["recovery"]["L"]) == {"zmask", "lgs"}
    assert results["operating_point"]["threshold"] == toy_setup[1].state.threshold
    again, _ = _run(toy_setup, tmp_path / "b")
    first, second = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("a", "b"))
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_patched_batches_placements_stretch_a_small_split(toy_setup):
    from zmask.evaluation import FitPlan, patched_batches

    _, _, dataset, patches = toy_setup
    once = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2)
    three = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=3)
    assert sum(len(images) for images, _ in three) == 3 * len(dataset)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(once, three))  # the first pass is the plain draw
    patched_masks = torch.cat([masks for _, masks in three]).flatten(1).amax(1)
    assert 0 < patched_masks.sum() < len(patched_masks)  # both clean and patched samples
    again = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(three, again))
    with pytest.raises(ValueError, match="placements"):
        patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=0)


def test_fit_plan_target_fpr_bounds_the_calibration_false_alarms(toy_setup):
    import dataclasses

    from zmask.evaluation import FitPlan, fit_zmask

    model, _, dataset, patches = toy_setup
    plan = FitPlan(statistics_images=3, fusion_images=3, calibration_images=2, batch_size=4, placements=4,
                   fusion=FusionTraining(epochs=2, batch_size=4, learning_rate=0.05), target_fpr=0.0)
    _, strict = fit_zmask(model, TOY_CONFIG, dataset, patches, plan, progress=False)
    assert strict["calibration"]["criterion"] == "fpr<=0.0" and strict["calibration"]["false_positive_rate"] == 0.0
    _, youden = fit_zmask(model, TOY_CONFIG, dataset, patches, dataclasses.replace(plan, target_fpr=None), progress=False)
    assert youden["calibration"]["criterion"] == "youden"
    assert youden["threshold"] <= strict["threshold"]


def test_hard_negatives_are_occluded_clean_samples_with_empty_masks(toy_setup):
    from zmask.evaluation import FitPlan, patched_batches

    _, _, dataset, patches = toy_setup
    plain = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=2)
    hard = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=2, hard_negatives=1.0)
    originals = torch.stack([item["image"] for item in dataset] * 2)
    images, masks = torch.cat([b[0] for b in hard]), torch.cat([b[1] for b in hard])
    clean = masks.flatten(1).amax(1) == 0
    assert 0 < clean.sum() < len(clean)
    changed = (images - originals).abs().flatten(1).amax(1) > 0
    assert changed[clean].all()  # every clean sample carries an occluder, still labelled "no patch"
    # the paper's setting (no hard negatives) is untouched by the option's existence
    again = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=2, hard_negatives=0.0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, again))
    with pytest.raises(ZMaskError, match="hard_negatives"):
        patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, hard_negatives=1.5)


def test_calibration_knows_which_negatives_carry_an_occluder(toy_setup):
    from zmask.evaluation import FitPlan, patched_batches

    _, defense, dataset, patches = toy_setup
    plain = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=2, hard_negatives=0.5)
    marked = patched_batches(dataset, patches, 4, FitPlan().eot, seed=2, placements=2, hard_negatives=0.5, mark_occluders=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, marked))  # same draws
    originals = torch.stack([item["image"] for item in dataset] * 2)
    images, masks, occluded = (torch.cat([b[k] for b in marked]) for k in range(3))
    clean = masks.flatten(1).amax(1) == 0
    changed = (images - originals).abs().flatten(1).amax(1) > 0
    assert occluded.any() and torch.equal(occluded, clean & changed)
    defense = copy.deepcopy(defense)  # the fixture's defense is shared
    calibration = defense.calibrate(marked, target_fpr=0.0)
    assert calibration.criterion == "fpr<=0.0 per negative kind" and calibration.false_positive_rate == 0.0
    images, masks, _ = next(batch for batch in marked if batch[1].flatten(1).amax(1).gt(0).any())
    with pytest.raises(ZMaskError, match="non-empty patch mask"):
        defense.calibrate([(images, masks, torch.ones(images.shape[0], dtype=torch.bool))], target_fpr=0.0)


def test_adaptive_attacks_are_reported_next_to_the_random_noise_control(toy_setup, tmp_path):
    """Each defense-aware attack gets Z-Mask's flag rate, mask IoU and defended metric beside the
    random-noise control's, the gap between them with an interval, and the strongest is named."""
    from zmask.attacks.patch_io import random_noise_patch

    model, defense, dataset, patches = toy_setup
    noise = random_noise_patch(tuple(patches[0].shape[-2:]), 0)
    spec = ExperimentSpec("toy", {"random L": noise, "L": patches[0]}, {}, {("mask", 0.0): patches[1], ("flag", 0.0): patches[0]},
                          seed=3, batch_size=4, examples=0)
    results = run_experiments(SegmentationTask(model, 3, 255), dataset, defense, spec, [ZMaskDefense(defense), NoDefense(model)],
                              [ZMaskDefense(defense)], tmp_path, progress=False)
    adaptive = results["adaptive"]
    assert adaptive["control"] == "random L" and set(adaptive["attacks"]) == {"flag alpha=0.0", "mask alpha=0.0"}
    control = results["masking"]["random L"]["zmask"]["miou"]
    for name, row in adaptive["attacks"].items():
        defended = results["alpha_sweep"][name]["zmask"]
        assert row["miou"] == defended["miou"] and row["control"] == control
        assert row["gap"] == pytest.approx(defended["miou"] - control)
        assert row["flag_rate"] == defended["flag_rate"] and row["mask_iou"] == defended["mask_iou"]
        low, high = row["gap_ci"]
        assert low <= high
    assert adaptive["strongest"] == min(adaptive["attacks"], key=lambda name: adaptive["attacks"][name]["gap"])
    assert "## Adaptive attacks against Z-Mask next to the random-noise control" in (tmp_path / "summary.md").read_text()
