"""Profiles: round trip, and every way a profile file can be wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from zmask import ProfileError, ZMask
from zmask.core.profile import MAX_PROFILE_BYTES

from ..toy import TOY_CONFIG, ToyNet, clean_batches, patched_batch, seeded_toy


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = seeded_toy()
    defense = ZMask(model, TOY_CONFIG.replace(fill_value=0.5))
    defense.fit_statistics(clean_batches(2))
    defense.calibrate([patched_batch(4), (clean_batches(1, 4)[0], torch.zeros(4, 1, 96, 128))])
    path = defense.save(tmp_path_factory.mktemp("profiles") / "toy.safetensors")
    return defense, path


def test_round_trip_gives_identical_results(saved):
    defense, path = saved
    loaded = ZMask.load(path, defense.model)
    assert loaded.config == defense.config
    assert loaded.state.threshold == defense.state.threshold
    assert loaded.state.input_size == (96, 128)
    assert loaded.state.calibration_mask_iou == defense.state.calibration_mask_iou is not None  # every fitted value comes back
    images, _ = patched_batch(2, seed=3)
    first, second = defense(images), loaded(images)
    torch.testing.assert_close(first.detection.score, second.detection.score, rtol=0, atol=0)
    torch.testing.assert_close(first.output, second.output, rtol=0, atol=0)


def test_saved_profile_has_the_umask_mode_and_no_leftovers(saved, tmp_path):
    import os

    defense, _ = saved
    previous = os.umask(0o022)
    try:
        path = defense.save(tmp_path / "mode.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # not the 0600 of a temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mode.safetensors"]  # written atomically, no temporary left


def test_truncated_profile(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for length in (4, 100, len(data) - 10):
        broken = tmp_path / f"truncated{length}.safetensors"
        broken.write_bytes(data[:length])
        with pytest.raises(ProfileError, match="truncated|corrupted"):
            ZMask.load(broken, seeded_toy())


def test_corrupted_tensor_bytes_are_detected(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    broken = tmp_path / "flipped.safetensors"
    broken.write_bytes(bytes(data))
    with pytest.raises(ProfileError, match="SHA-256"):
        ZMask.load(broken, seeded_toy())


def test_not_a_profile(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ProfileError):
        ZMask.load(path, seeded_toy())
    with pytest.raises(ProfileError, match="does not exist"):
        ZMask.load(tmp_path / "missing.safetensors", seeded_toy())
    header = json.dumps({"__metadata__": {"format": "other"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ProfileError, match="not a zmask profile"):
        ZMask.load(path, seeded_toy())


def test_oversized_profile_is_refused(saved, tmp_path, monkeypatch):
    _, path = saved
    monkeypatch.setattr("zmask.core.profile.MAX_PROFILE_BYTES", 100)
    with pytest.raises(ProfileError, match="more than the 100 allowed"):
        ZMask.load(path, seeded_toy())
    assert MAX_PROFILE_BYTES > 1_000_000


def test_profile_for_another_model(saved):
    _, path = saved

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 8, 3)

    with pytest.raises(ProfileError, match="does not fit this model.*no layer 'c1'"):
        ZMask.load(path, Renamed())

    class Narrow(ToyNet):
        def __init__(self):
            super().__init__()
            self.c2, self.c3 = nn.Conv2d(8, 12, 3, 2, 1), nn.Conv2d(12, 32, 3, 2, 1)

    with pytest.raises(ProfileError, match="layer 'c2' has 16 channels; this model's has 12"):
        ZMask.load(path, Narrow())


def test_saving_requires_statistics(tmp_path):
    with pytest.raises(ProfileError, match="fit_statistics"):
        ZMask(seeded_toy(), TOY_CONFIG).save(tmp_path / "empty.safetensors")


def test_provenance_round_trip_and_schema(saved, tmp_path):
    from safetensors.torch import load_file, safe_open, save_file

    defense, _ = saved
    defense.state.provenance = {"layer_selection": {"shallow": ["c1"], "evidence": [{"layer": "c1", "auc": 0.9}]}, "hard_negatives": 0.5}
    path = defense.save(tmp_path / "with_provenance.safetensors")
    defense.state.provenance = None
    assert ZMask.load(path, defense.model).state.provenance == {"layer_selection": {"shallow": ["c1"], "evidence": [{"layer": "c1", "auc": 0.9}]},
                                                          "hard_negatives": 0.5}
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    for bad, problem in (("[1, 2]", "JSON object"), ("{", "not valid JSON"), (json.dumps({"x": "y" * 300_000}), "longer than")):
        target = tmp_path / "bad.safetensors"
        save_file(load_file(str(path)), str(target), metadata={**metadata, "provenance": bad})
        with pytest.raises(ProfileError, match=f"provenance.*{problem}"):
            ZMask.load(target, defense.model)


def test_a_huge_fitted_input_size_is_probed_at_a_bounded_size(saved, monkeypatch):
    """A crafted profile with input_size 4096x4096 (the schema's maximum) must not make loading run
    the model on a 4096x4096 image (it took > 60 s and gigabytes): the blank probe is halved first."""
    import zmask.core.profile as profile_module
    from zmask.core.profile import MAX_PROBE_PIXELS, load_profile, probe_input_size

    assert probe_input_size((96, 128)) == (96, 128)
    assert probe_input_size((4096, 4096)) == (1024, 1024) and probe_input_size((2048, 2048)) == (1024, 1024)
    assert probe_input_size((3001, 4097))[0] * probe_input_size((3001, 4097))[1] <= MAX_PROBE_PIXELS
    defense, path = saved
    loaded = load_profile(path)
    loaded.state.input_size = (4096, 4096)
    seen = []
    original = profile_module.run_and_capture
    monkeypatch.setattr(profile_module, "run_and_capture", lambda model, images, *a: seen.append(tuple(images.shape)) or original(model, images, *a))
    profile_module.check_model_fits(loaded, defense.model, path)
    assert seen == [(1, 3, 1024, 1024)]
