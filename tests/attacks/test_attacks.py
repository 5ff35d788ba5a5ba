"""Patch placement, attack optimisation (plain, activation-aware, defense-aware), patch files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zmask.core.capture import run_and_capture
from zmask import FittedState, FusionTraining, ZMask, ZMaskError
from zmask.attacks import AttackConfig, EOTConfig, PatchAttack, apply_patch, load_patch, patch_size, random_noise_patch, save_patch
from zmask.tasks import SegmentationTask

from ..toy import TOY_CONFIG, clean_batches, patched_batch


def test_footprint_is_exactly_where_the_patch_landed():
    images = torch.zeros(2, 3, 40, 50)
    patch = torch.rand(3, 10, 12) * 0.5 + 0.5
    placed = apply_patch(images, patch, torch.Generator().manual_seed(0), EOTConfig.none(quantize=False))
    for image, mask, box in zip(placed.images, placed.masks, placed.boxes):
        x1, y1, x2, y2 = (int(v) for v in box)
        assert (x2 - x1, y2 - y1) == (12, 10)
        expected = torch.zeros(1, 40, 50)
        expected[:, y1:y2, x1:x2] = 1
        assert torch.equal(mask, expected)
        torch.testing.assert_close(image[:, y1:y2, x1:x2], patch)
        assert image[:, mask[0] == 0].abs().max() == 0
    fixed = apply_patch(images, patch, position=(5, 7), eot=EOTConfig.none(quantize=False))
    assert fixed.boxes[0].tolist() == [7.0, 5.0, 19.0, 15.0]


def test_gradients_reach_the_patch_through_eot():
    patch = torch.rand(3, 8, 8, requires_grad=True)
    eot = EOTConfig(scale=(0.8, 1.3), noise_std=0.05, brightness=0.1, contrast=0.1, rotation_degrees=15)
    placed = apply_patch(torch.rand(3, 3, 32, 32), patch, torch.Generator().manual_seed(1), eot)
    (placed.images * torch.rand_like(placed.images)).sum().backward()
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    assert set(placed.masks.unique().tolist()) <= {0.0, 1.0}


def test_placement_is_seeded_and_border_rules():
    images, patch = torch.rand(3, 3, 32, 32), torch.rand(3, 6, 6)
    first = apply_patch(images, patch, torch.Generator().manual_seed(5))
    second = apply_patch(images, patch, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.images, second.images, rtol=0, atol=0)
    with pytest.raises(ZMaskError, match="larger than the image"):
        apply_patch(images, torch.rand(3, 40, 10), eot=EOTConfig.none())
    with pytest.raises(ZMaskError, match="does not fit"):
        apply_patch(images, patch, eot=EOTConfig.none(), position=(30, 30))
    partial = apply_patch(images, patch, eot=EOTConfig.none(), position=(-2, 29), allow_border=True)
    assert int(partial.masks.sum()) == 3 * (4 * 3)
    with pytest.raises(ZMaskError, match=r"must be 3 x h x w.*\(4, 6, 6\)"):
        apply_patch(images, torch.rand(4, 6, 6))


def test_patch_png_round_trip(tmp_path):
    patch = random_noise_patch((7, 9), seed=3)
    path = save_patch(patch, tmp_path / "p.png", {"beta": 0.5, "seed": 3})
    loaded, metadata = load_patch(path)
    assert torch.equal(loaded, patch)
    assert metadata["beta"] == 0.5 and metadata["height"] == 7 and metadata["width"] == 9
    with pytest.raises(ZMaskError, match="PNG"):
        save_patch(patch, tmp_path / "p.jpg")


def test_bad_attack_settings():
    for name in ("beta", "alpha"):
        with pytest.raises(ZMaskError, match=f"{name}=1.5 must lie in"):
            AttackConfig(patch_size=(4, 4), **{name: 1.5})
        with pytest.raises(ZMaskError, match=f"{name}=-0.1 must lie in"):
            AttackConfig(patch_size=(4, 4), **{name: -0.1})
    with pytest.raises(ZMaskError, match="need a fitted ZMask"):
        PatchAttack(object(), AttackConfig(patch_size=(4, 4), beta=0.5))
    assert patch_size("segmentation", "L", (360, 480)) == (105, 141)
    with pytest.raises(ZMaskError, match="unknown patch size"):
        patch_size("segmentation", "XL", (360, 480))


class ToySegmenter(nn.Module):
    """The toy network with a 4-class per-pixel head at input resolution."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        features = self.body(x)
        return nn.functional.interpolate(self.head(features), size=x.shape[-2:], mode="nearest")


@pytest.fixture(scope="module")
def toy_setup():
    from ..toy import seeded_toy

    torch.manual_seed(0)
    model = ToySegmenter(seeded_toy()).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = TOY_CONFIG.replace(shallow_layers=("body.c1", "body.c2"), deep_layers=("body.c2", "body.c3"))
    defense = ZMask(model, config)
    defense.fit_statistics(clean_batches(4))
    patched = [patched_batch(4, seed=s) for s in range(4)]
    clean = [(c, torch.zeros(4, 1, 96, 128)) for c in clean_batches(4, 4, seed=9)]
    defense.fit_fusion(patched + clean, FusionTraining(epochs=20, batch_size=8, learning_rate=0.05))
    defense.calibrate(patched + clean)
    with torch.no_grad():
        data = [{"image": image, "label": model(image[None])[0].argmax(0)} for image in torch.cat(clean_batches(4, 4, seed=21))]
    return model, defense, data


def _mean(history, key, part):
    values = [h[key] for h in history]
    return sum(values[:part]) / part if part > 0 else sum(values[part:]) / -part


def test_plain_attack_raises_the_task_loss_and_is_deterministic(toy_setup):
    model, _, data = toy_setup
    task = SegmentationTask(model, 4, 255)
    config = AttackConfig(patch_size=(24, 24), steps=12, batch_size=4, learning_rate=0.05, seed=2)
    first = PatchAttack(task, config).run(data, progress=False)
    second = PatchAttack(task, config).run(data, progress=False)
    assert torch.equal(first.patch, second.patch)
    total = [h["ce_correct"] + h["ce_wrong"] for h in first.history]
    assert sum(total[-4:]) < sum(total[:4])  # the minimised negative CE goes down


@pytest.mark.parametrize("setup,mode,term", [("toy_setup", "mask", "mask_bce"), ("toy_setup", "flag", "flag_bce"),
                                             ("toy_setup", "suppress", "heatmaps_inside_patch"),
                                             ("layered_setup", "suppress_all", "extremes_inside_patch"),
                                             ("layered_setup", "flag_evasion", "flag_margin"), ("layered_setup", "decoy", "decoy_soft_mask")])
def test_defense_aware_attacks_lower_their_losses(request, setup, mode, term):
    """Each objective lowers its own term, the layered ones against a defense with layered evidence."""
    model, defense, data = request.getfixturevalue(setup)
    task = SegmentationTask(model, 4, 255)
    config = AttackConfig(patch_size=(24, 24), steps=16, batch_size=4, learning_rate=0.05, defense_attack=mode, alpha=0.0, seed=1)
    history = PatchAttack(task, config, defense).run(data, progress=False).history
    assert _mean(history, term, -4) < _mean(history, term, 4)


def test_activation_aware_attack_lowers_over_activation(toy_setup):
    model, defense, data = toy_setup
    task = SegmentationTask(model, 4, 255)
    config = AttackConfig(patch_size=(24, 24), steps=16, batch_size=4, learning_rate=0.05, beta=0.0, seed=1)
    history = PatchAttack(task, config, defense).run(data, progress=False).history
    assert _mean(history, "over_activation", -4) < _mean(history, "over_activation", 4)


def test_straight_through_keep_mask_is_the_defense_mask_forward_with_gradients(toy_setup):
    """Forward: the very keep-mask the defense applies (flagged and unflagged images, dilation);
    backward: a gradient reaches the image through the soft mask and the flag."""
    from zmask.core.masking import straight_through_keep_mask

    _, defense, _ = toy_setup
    images, _ = patched_batch(4, seed=40)
    images = torch.cat([images, clean_batches(1, 2, seed=41)[0]]).requires_grad_(True)
    state = defense.state
    dilated = ZMask(defense.model, defense.config.replace(mask_dilation=3), FittedState(state.statistics, state.fusion, state.threshold))
    _, activations = dilated.capture(images)
    analysis = dilated.analyze(activations, tuple(images.shape[-2:]))
    assert analysis.flagged.any() and not analysis.flagged.all()
    keep = straight_through_keep_mask(analysis, dilated.state.threshold)
    assert torch.equal(keep.detach(), analysis.keep_mask)
    (gradient,) = torch.autograd.grad(keep.sum(), images)
    assert gradient.abs().sum() > 0


def test_end_to_end_objective_is_the_task_loss_of_the_defended_output(toy_setup):
    """The end-to-end term evaluates exactly what the defended model outputs (same masks, same
    second pass), and its gradient reaches the patched images."""
    from zmask.attacks import ADAPTIVE_OBJECTIVES
    from zmask.contracts import AttackContext

    model, defense, data = toy_setup
    task = SegmentationTask(model, 4, 255)
    images, masks = patched_batch(4, seed=42)
    batch = task.collate([{"image": image, "label": item["label"]} for image, item in zip(images, data)])
    images = images.clone().requires_grad_(True)
    output, activations = run_and_capture(model, images, defense.config.layers)
    analysis = defense.analyze(activations, tuple(images.shape[-2:]), gate=False)
    context = AttackContext(defense, images, masks, output, activations, analysis, task, batch)
    value = ADAPTIVE_OBJECTIVES.get("end_to_end")(context)["defended_task"]
    with torch.no_grad():
        defended = defense(images.detach()).output
    expected = sum(w * v for w, v in task.attack_terms(defended, batch, images, masks, 1.0, "untargeted").values())
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    (gradient,) = torch.autograd.grad(value, images)
    assert gradient.abs().sum() > 0


@pytest.mark.parametrize("settings", [{"learning_rate": float("nan")}, {"learning_rate": float("inf")}, {"learning_rate": 0.0},
                                      {"smoothness_weight": float("nan")}, {"printability_weight": -1.0}])
def test_attack_settings_must_be_finite(settings):
    from zmask import ConfigError

    with pytest.raises(ConfigError):
        AttackConfig(patch_size=(4, 4), **settings)


@pytest.fixture(scope="module")
def layered_setup(toy_setup):
    """The toy segmenter's defense with layered evidence: extreme statistics, joint thresholds,
    keep-mask candidates of the patch size."""
    model, defense, data = toy_setup
    config = defense.config.replace(extreme_layers=("body.c2", "body.c3"), mask_candidates=True, candidate_windows=((24, 24),))
    layered = ZMask(model, config, seed=0)
    layered.fit_statistics(clean_batches(4))
    patched = [patched_batch(4, seed=s, size=24) for s in range(4)]
    clean = [(c, torch.zeros(4, 1, 96, 128)) for c in clean_batches(4, 4, seed=9)]
    layered.fit_fusion(patched + clean, FusionTraining(epochs=20, batch_size=8, learning_rate=0.05))
    layered.calibrate(patched + clean)
    return model, layered, data


@pytest.mark.parametrize("choice", ["clearance", "effect"])
def test_end_to_end_follows_the_candidate_the_defense_chooses(layered_setup, choice):
    """Against a defense that chooses among keep-masks (by either rule), the end-to-end term is the
    task loss of the defended output (the same chosen re-pass), and its gradient still reaches the
    images."""
    from zmask.attacks import ADAPTIVE_OBJECTIVES
    from zmask.contracts import AttackContext

    model, layered, data = layered_setup
    defense = ZMask(model, layered.config.replace(candidate_choice=choice), layered.state)
    task = SegmentationTask(model, 4, 255)
    images, masks = patched_batch(4, seed=42, size=24)
    batch = task.collate([{"image": image, "label": item["label"]} for image, item in zip(images, data)])
    images = images.clone().requires_grad_(True)
    output, activations = run_and_capture(model, images, defense.config.layers)
    analysis = defense.analyze(activations, tuple(images.shape[-2:]), gate=False)
    context = AttackContext(defense, images, masks, output, activations, analysis, task, batch)
    value = ADAPTIVE_OBJECTIVES.get("end_to_end")(context)["defended_task"]
    with torch.no_grad():
        result = defense(images.detach())
    assert result.detection.candidate is not None
    expected = sum(w * v for w, v in task.attack_terms(result.output, batch, images, masks, 1.0, "untargeted").values())
    assert value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    (gradient,) = torch.autograd.grad(value, images)
    assert gradient.abs().sum() > 0
