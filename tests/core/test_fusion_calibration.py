"""Fusion block training, detection scores and the ROC threshold."""

from __future__ import annotations

import pytest
import torch

from zmask import FusionBlock, FusionTraining, calibrate_threshold, detection_score
from zmask.core.fusion import train_fusion


def synthetic_heatmaps(count: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shallow = torch.rand(count, 1, 16, 16, generator=generator) * 0.05
    deep = torch.rand(count, 1, 16, 16, generator=generator) * 0.05
    targets = torch.zeros(count, 1, 16, 16)
    for i in range(count // 2):
        top, left = int(torch.randint(0, 10, (1,), generator=generator)), int(torch.randint(0, 10, (1,), generator=generator))
        targets[i, :, top : top + 6, left : left + 6] = 1
        shallow[i] += targets[i] * 0.6
        deep[i] += targets[i] * 0.4
    return shallow, deep, targets


def test_training_lowers_the_loss_and_learns_the_mask():
    shallow, deep, targets = synthetic_heatmaps()
    block = FusionBlock(torch.Generator().manual_seed(0))
    history = train_fusion(block, shallow, deep, targets, FusionTraining(epochs=60, batch_size=8, learning_rate=0.05))
    assert history[-1] < 0.5 * history[0]
    with torch.no_grad():
        predicted = block(shallow, deep) > 0.5
    intersection = (predicted & targets.bool()).sum()
    union = (predicted | targets.bool()).sum()
    assert float(intersection / union) > 0.7


def test_training_is_deterministic_for_a_seed():
    shallow, deep, targets = synthetic_heatmaps()
    values = []
    for _ in range(2):
        block = FusionBlock(torch.Generator().manual_seed(3))
        train_fusion(block, shallow, deep, targets, FusionTraining(epochs=3, seed=7))
        values.append(block.values())
    assert values[0] == values[1]


def test_training_rejects_bad_targets():
    shallow, deep, targets = synthetic_heatmaps(4)
    with pytest.raises(ValueError, match="binary"):
        train_fusion(FusionBlock(), shallow, deep, targets * 0.5 + 0.25)
    with pytest.raises(ValueError, match="one shape"):
        train_fusion(FusionBlock(), shallow, deep[:, :, :8], targets)


def test_score_definitions():
    shallow = torch.full((1, 1, 2, 2), 0.5)
    deep = torch.full((1, 1, 2, 2), 0.4)
    soft = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert detection_score(shallow, deep, soft, "reference").item() == pytest.approx(0.2 * 1.5 / 2.5)
    assert detection_score(shallow, deep, soft, "paper").item() == pytest.approx(0.2 * 1.5 / 1.5)
    with pytest.raises(ValueError, match="unknown score"):
        detection_score(shallow, deep, soft, "other")


def test_youden_threshold_separates_separable_scores():
    clean, patched = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.9])
    calibration = calibrate_threshold(clean, patched)
    assert 0.3 < calibration.threshold < 0.5
    assert calibration.auc == 1.0 and calibration.true_positive_rate == 1.0 and calibration.false_positive_rate == 0.0


def test_target_fpr_threshold_respects_the_fpr():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(200, generator=generator)
    patched = torch.randn(200, generator=generator) + 1.5
    calibration = calibrate_threshold(clean, patched, target_fpr=0.05)
    assert calibration.false_positive_rate <= 0.05
    assert float((clean > calibration.threshold).float().mean()) == pytest.approx(calibration.false_positive_rate)
    loose = calibrate_threshold(clean, patched, target_fpr=0.3)
    assert loose.true_positive_rate >= calibration.true_positive_rate


def test_calibration_rejects_bad_scores():
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([0.1, float("nan")], [1.0])
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate_threshold([0.1], [1.0], target_fpr=2.0)


def test_authors_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a Z-Mask fusion checkpoint"):
        FusionBlock.from_authors_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read fusion checkpoint"):
        FusionBlock.from_authors_checkpoint(path)


def test_min_steps_extends_training_on_small_sets():
    shallow, deep, targets = synthetic_heatmaps(count=6)
    few = train_fusion(FusionBlock(torch.Generator().manual_seed(0)), shallow, deep, targets, FusionTraining(epochs=5, batch_size=4))
    assert len(few) == 5
    block = FusionBlock(torch.Generator().manual_seed(0))
    more = train_fusion(block, shallow, deep, targets, FusionTraining(epochs=5, batch_size=4, min_steps=100))
    assert len(more) == 50  # 2 batches per epoch
    assert more[-1] < few[-1]
    with pytest.raises(ValueError, match="invalid training settings"):
        train_fusion(block, shallow, deep, targets, FusionTraining(min_steps=-1))


def test_mask_threshold_choice_finds_the_threshold_a_weak_soft_mask_needs():
    from zmask.core.masking import choose_mask_threshold, mask_iou
    from zmask.errors import InputError

    truth = torch.zeros(3, 1, 16, 16)
    truth[:, :, 4:10, 4:10] = 1
    soft = 0.3 + 0.15 * truth + 0.02 * torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # never reaches 0.5
    assert float(mask_iou((soft > 0.5).float(), truth).mean()) == 0.0
    threshold, iou = choose_mask_threshold(soft, torch.nn.functional.interpolate(truth, size=(32, 32)))  # any resolution
    assert 0.32 <= threshold < 0.45 and iou == pytest.approx(1.0)
    with pytest.raises(InputError, match="same B"):
        choose_mask_threshold(soft, truth[:2])
