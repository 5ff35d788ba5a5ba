"""Channel-extreme evidence: statistics of channel maxima, the HN-style score, the coverage mask."""

from __future__ import annotations

import torch

from zmask.core.extremes import ExtremeAccumulator, coverage_map, extreme_score


def test_streamed_statistics_equal_the_direct_ones():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 8, 10, generator=generator) for _ in range(4)]
    whole = ExtremeAccumulator()
    for batch in batches:
        whole.update({"a": batch})
    stats = whole.compute()["a"]
    maxima = torch.cat(batches).flatten(2).amax(2).double()
    torch.testing.assert_close(stats.mean, maxima.mean(0).float())
    torch.testing.assert_close(stats.std, maxima.std(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.upper, maxima.amax(0).float())


def test_score_and_coverage_find_a_hyperactivated_channel():
    generator = torch.Generator().manual_seed(1)
    accumulator = ExtremeAccumulator()
    accumulator.update({"a": torch.randn(16, 6, 8, 10, generator=generator)})
    extremes = accumulator.compute()
    clean = torch.randn(2, 6, 8, 10, generator=generator)
    attacked = clean.clone()
    attacked[1, 2, 3:5, 4:6] = 50.0  # one channel far above its clean maximum, in a 2 x 2 region
    scores = extreme_score({"a": attacked}, extremes)
    assert scores[1] > 5 * scores[0] and scores[1] > extreme_score({"a": clean}, extremes)[1]
    mask = torch.nn.functional.interpolate(coverage_map({"a": attacked}, extremes), size=(16, 20), mode="nearest")
    assert mask.shape == (2, 1, 16, 20)
    assert mask[1, 0, 6:10, 8:12].all() and mask[1].sum() < 40


def test_hardened_defense_round_trips_through_its_profile(tmp_path):
    """A defense with channel-extreme evidence saves and reloads its extra statistics and threshold,
    and decides exactly as before."""
    import pytest

    from zmask import ConfigError, FusionTraining, ZMask

    from ..toy import TOY_CONFIG, clean_batches, patched_batch, seeded_toy

    with pytest.raises(ConfigError, match="extreme_layers"):
        TOY_CONFIG.replace(extreme_layers=("nowhere",))
    defense = ZMask(seeded_toy(), TOY_CONFIG.replace(extreme_layers=("c3",)), seed=0)
    defense.fit_statistics(clean_batches(6))
    patched = [patched_batch(4, seed=s) for s in range(6)]
    clean = [(images, torch.zeros(images.shape[0], 1, *images.shape[2:])) for images in clean_batches(6, 4, seed=9)]
    defense.fit_fusion(patched + clean, FusionTraining(epochs=10, batch_size=8, learning_rate=0.05))
    defense.calibrate(patched[:3] + clean[:3], target_fpr=0.1)
    assert defense.state.extreme_threshold is not None and defense.state.extreme_calibration.false_positive_rate <= 0.01
    # the two thresholds were chosen together: the calibration's operating point is the combined flag's
    calibration_images = torch.cat([images for images, _ in clean[:3]])
    with torch.no_grad():
        flagged_clean = defense.detect(calibration_images).flagged.float().mean().item()
    assert flagged_clean == pytest.approx(defense.state.calibration.false_positive_rate) and flagged_clean <= 0.1
    assert defense.state.calibration.criterion == "joint fpr<=0.1"
    loaded = ZMask.load(defense.save(tmp_path / "hardened.safetensors"), seeded_toy())
    images = torch.cat([patched_batch(2, seed=77)[0], clean_batches(1, 2, seed=78)[0]])
    with torch.no_grad():
        first, second = defense.detect(images), loaded.detect(images)
    assert loaded.state.extreme_threshold == defense.state.extreme_threshold
    assert torch.equal(first.flagged, second.flagged) and torch.equal(first.keep_mask, second.keep_mask)
    assert torch.equal(first.extreme_score, second.extreme_score)


def test_coverage_is_masked_only_when_asked():
    from zmask import ZMask

    from ..toy import TOY_CONFIG, clean_batches, patched_batch, seeded_toy

    images, _ = patched_batch(2, seed=5)
    for extreme_mask in (False, True):
        defense = ZMask(seeded_toy(), TOY_CONFIG.replace(extreme_layers=("c3",), extreme_mask=extreme_mask), seed=0)
        defense.fit_statistics(clean_batches(3))
        with torch.no_grad():
            analysis = defense.analyze(defense.capture(images)[1], tuple(images.shape[-2:]), gate=False)
        assert analysis.extreme_score is not None and (analysis.coverage is not None) == extreme_mask
