"""The defended model end to end on the toy network: fitting, gating, masking, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zmask import FittedState, FusionTraining, InputError, NotFittedError, ZMask, ZMaskConfig
from zmask.defense import merge_outputs

from .toy import TOY_CONFIG, clean_batches, fitted_toy_defense, patched_batch, seeded_toy


@pytest.fixture(scope="module")
def fitted():
    return fitted_toy_defense()


def test_detects_and_masks_patches(fitted):
    images, masks = patched_batch(4, seed=200)
    result = fitted(images)
    assert result.detection.flagged.all()
    keep = result.detection.keep_mask
    assert keep.shape == (4, 1, 96, 128)
    covered = ((1 - keep) * masks).sum() / masks.sum()
    assert covered > 0.5, f"only {float(covered):.2f} of the patch pixels were masked"


def test_clean_images_are_not_reprocessed(fitted, monkeypatch):
    calls = []
    original = fitted.model.forward
    monkeypatch.setattr(fitted.model, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    clean = clean_batches(1, 3, seed=77)[0]
    result = fitted(clean)
    assert not result.detection.flagged.any()
    assert calls == [3], "a batch with no flagged image must not run the model a second time"
    assert torch.all(result.detection.keep_mask == 1)
    torch.testing.assert_close(result.output, original(clean))


def test_only_flagged_images_are_reprocessed(fitted, monkeypatch):
    images, _ = patched_batch(2, seed=300)
    batch = torch.cat([images, clean_batches(1, 2, seed=78)[0]])
    calls = []
    original = fitted.model.forward
    monkeypatch.setattr(fitted.model, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    result = fitted(batch)
    assert result.detection.flagged.tolist() == [True, True, False, False]
    assert calls == [4, 2]
    masked = fitted.apply_mask(batch[:2], result.detection.keep_mask[:2])
    torch.testing.assert_close(result.output[:2], original(masked))
    torch.testing.assert_close(result.output[2:], original(batch[2:]))


def test_gate_off_masks_everything_and_fill_value(fitted):
    images, _ = patched_batch(1, seed=5)
    detection = fitted.detect(images, gate=False)
    assert detection.flagged.all()
    defense = ZMask(fitted.model, TOY_CONFIG.replace(fill_value=(0.1, 0.2, 0.3)), FittedState(fitted.state.statistics, fitted.state.fusion))
    keep = torch.zeros(1, 1, 96, 128)
    filled = defense.apply_mask(images, keep)
    assert torch.allclose(filled[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))


def test_return_heatmaps_and_determinism(fitted):
    images, _ = patched_batch(2, seed=9)
    first = fitted(images, return_heatmaps=True)
    second = fitted(images, return_heatmaps=True)
    assert first.heatmaps.shallow.shape == (2, 1, 48, 64)
    torch.testing.assert_close(first.detection.score, second.detection.score, rtol=0, atol=0)


def test_fitting_is_reproducible_with_a_seed():
    values = []
    for _ in range(2):
        defense = ZMask(seeded_toy(), TOY_CONFIG, seed=4)
        defense.fit_statistics(clean_batches(2))
        defense.fit_fusion([patched_batch(4, seed=1)], FusionTraining(epochs=2, seed=4))
        values.append(defense.state.fusion.values())
    assert values[0] == values[1]


def test_fit_statistics_restores_training_mode_and_max_images():
    model = seeded_toy().train()
    defense = ZMask(model, TOY_CONFIG)
    defense.fit_statistics(clean_batches(5, 2), max_images=3)
    assert model.training
    assert defense.state.input_size == (96, 128)


@pytest.mark.parametrize(
    "images,error,pattern",
    [
        ([1.0], TypeError, "must be a torch.Tensor"),
        (torch.rand(3, 96, 128), ValueError, "must be 4-D.*unsqueeze"),
        (torch.zeros(1, 3, 96, 128, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.rand(0, 3, 96, 128), ValueError, "empty batch"),
        (torch.rand(1, 4, 96, 128), ValueError, "4 channels, the model expects 3"),
        (torch.full((1, 3, 96, 128), float("nan")), ValueError, "NaN or Inf"),
        (torch.full((1, 3, 96, 128), float("inf")), ValueError, "NaN or Inf"),
    ],
)
def test_bad_images_get_clear_errors(fitted, images, error, pattern):
    with pytest.raises(error, match=pattern):
        fitted(images)


def test_configuration_errors():
    with pytest.raises(ValueError, match="larger than the heatmap size"):
        TOY_CONFIG.replace(heatmap_size=(10, 10))
    with pytest.raises(ValueError, match="spr_variant"):
        TOY_CONFIG.replace(spr_variant="other")
    with pytest.raises(ValueError, match="planes"):
        TOY_CONFIG.replace(planes=7)
    with pytest.raises(ValueError, match="unknown configuration keys"):
        ZMaskConfig.from_dict({**TOY_CONFIG.to_dict(), "kernal": 3})
    with pytest.raises(TypeError, match="sequence of module names"):
        ZMaskConfig(shallow_layers="c1", deep_layers=("c2",))
    with pytest.raises(ValueError, match="no layer 'c9'"):
        ZMask(seeded_toy(), TOY_CONFIG.replace(deep_layers=("c9",)))


def test_missing_fitted_state():
    defense = ZMask(seeded_toy(), TOY_CONFIG)
    images = torch.rand(1, 3, 96, 128)
    with pytest.raises(NotFittedError, match="fit_statistics"):
        defense(images)
    defense.fit_statistics(clean_batches(1))
    with pytest.raises(NotFittedError, match="calibrate"):
        defense(images)
    with pytest.raises(ValueError, match="both clean images"):
        defense.calibrate([patched_batch(2)])


def test_a_non_finite_score_is_an_error_never_not_flagged(fitted):
    images, _ = patched_batch(2, seed=201)
    with torch.no_grad():
        _, activations = fitted.capture(images)
    layer = fitted.config.shallow_layers[0]
    broken = {**activations, layer: activations[layer].clone().fill_(float("nan"))}
    with pytest.raises(InputError, match="not finite"):
        fitted.analyze(broken, (96, 128))


def test_statistics_for_another_model_are_rejected(fitted):
    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 24, 3, 2, 1), nn.Conv2d(24, 32, 3, 2, 1)

        def forward(self, x):
            return self.c3(self.c2(self.c1(x)))

    defense = ZMask(Wider(), TOY_CONFIG, FittedState(fitted.state.statistics, fitted.state.fusion, 0.1))
    with pytest.raises(ValueError, match="layer 'c2' has 24 channels but its statistics 16"):
        defense(torch.rand(1, 3, 96, 128))


def test_the_reused_capture_follows_a_changed_layer_set(fitted):
    import copy

    defense = copy.deepcopy(fitted)
    images = clean_batches(1, 2, seed=3)[0]
    with torch.no_grad():
        assert set(defense.capture(images)[1]) == {"c1", "c2", "c3"}
        defense.config = defense.config.replace(shallow_layers=("c1",), deep_layers=("c3",))
        first = defense.capture(images)[1]
        assert set(first) == {"c1", "c3"}
        assert torch.equal(defense.capture(images)[1]["c1"], first["c1"])  # the same hooks, re-entered


def test_merge_outputs_structures():
    index = torch.tensor([1])
    assert merge_outputs(torch.zeros(3, 2), torch.ones(1, 2), index)[1].tolist() == [1.0, 1.0]
    assert merge_outputs([{"a": 0}, {"a": 1}], [{"a": 9}], index) == [{"a": 0}, {"a": 9}]
    merged = merge_outputs({"x": torch.zeros(2)}, {"x": torch.ones(1)}, index)
    assert merged["x"].tolist() == [0.0, 1.0]
    with pytest.raises(TypeError, match="cannot merge"):
        merge_outputs("text", "text", index)


def test_mask_dilation_grows_the_mask(fitted):
    images, _ = patched_batch(1, seed=200)
    plain = fitted.detect(images, gate=False).keep_mask
    dilated = ZMask(fitted.model, TOY_CONFIG.replace(mask_dilation=3), FittedState(fitted.state.statistics, fitted.state.fusion)).detect(images, gate=False).keep_mask
    assert (1 - dilated).sum() > (1 - plain).sum()
    assert torch.all((1 - dilated) >= (1 - plain))
    with pytest.raises(ValueError, match="mask_dilation"):
        TOY_CONFIG.replace(mask_dilation=-1)


def test_defended_espnet_runs_in_bfloat16(assets):
    """The model in bfloat16: statistics and tables stay float32/float64, the masked second pass
    gets bfloat16 images, and the decisions agree with float32 on a clean and a patched frame."""
    from pathlib import Path

    from zmask.attacks import load_patch
    from zmask.evaluation import place_patches
    from zmask.models import get_preset

    root = Path(__file__).resolve().parents[1]
    preset = get_preset("espnet_camvid")
    image = preset.dataset("val", limit=1)[0]["image"][None]
    patch = load_patch(root / "src/zmask/patches/espnet_camvid_L_beta1.0.png")[0]
    attacked, _ = place_patches(image, patch, [0], 0)
    frames = torch.cat([image, attacked])
    profile = root / "src/zmask/profiles/espnet_camvid.safetensors"
    reference = ZMask.load(profile, preset.build(True))
    half = ZMask.load(profile, preset.build(True).to(torch.bfloat16))
    with torch.no_grad():
        expected = reference(frames)
        result = half(frames.to(torch.bfloat16))
    assert result.output.dtype == torch.bfloat16
    assert result.detection.flagged.tolist() == [False, True] == expected.detection.flagged.tolist()
    agreement = (result.output.argmax(1) == expected.output.argmax(1)).float().mean()
    assert agreement > 0.95


def test_headroom_calibration_anchors_both_thresholds_on_the_clean_scores():
    """With ``headroom`` the thresholds come from the clean calibration images alone: just above
    their highest score, so the flag is tighter than the ROC gap midpoint."""
    from zmask.core.calibration import clean_anchored_threshold

    defense = fitted_toy_defense(TOY_CONFIG.replace(extreme_layers=("c2", "c3")), epochs=5)
    images, masks = patched_batch(4, seed=11)
    clean = clean_batches(2, 4, seed=12)
    batches = [(torch.cat([images, clean[0]]), torch.cat([masks, torch.zeros_like(masks)])), (clean[1], torch.zeros_like(masks))]
    roc = defense.calibrate(batches).threshold
    anchored = defense.calibrate(batches, headroom=1.0)
    with torch.no_grad():
        clean_analysis = defense.detect(torch.cat(clean), gate=False)
    assert anchored.threshold == pytest.approx(clean_anchored_threshold(clean_analysis.score, 1.0), rel=1e-5)
    assert defense.state.extreme_threshold == pytest.approx(clean_anchored_threshold(clean_analysis.extreme_score, 1.0), rel=1e-5)
    assert anchored.threshold <= roc and anchored.false_positive_rate == 0.0
