"""Shipped profiles: each preset that has one knows its file, hash and figures; the file is checked
before use; ``ZMask.from_preset`` loads it onto the preset's model."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from zmask import ProfileError, ZMask
from zmask.assets import sha256_of
from zmask.core.profile import load_profile
from zmask.models import PRESETS, ProfileRecord, get_preset
from zmask.models import profiles as profiles_module

SHIPPED = sorted(name for name, preset in PRESETS.items() if preset.profile_record is not None)


def test_the_fitted_presets_ship_a_profile():
    assert {"espnet_camvid", "yolov5n_coco", "nanodet_m_coco", "fastestdet_coco"} <= set(SHIPPED)
    assert all(get_preset(name).profile_record.command for name in SHIPPED)  # each says how it was fitted


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_matches_its_record(name):
    preset = get_preset(name)
    record = preset.profile_record
    path = preset.profile()
    assert path == record.path and sha256_of(path) == record.sha256
    stored = load_profile(path)
    # the record's metadata agrees with the file: its threshold and the layers of the preset
    assert stored.state.threshold == pytest.approx(record.metrics["lambda0"], abs=5e-5)
    assert stored.config.shallow_layers == preset.shallow_layers and stored.config.deep_layers == preset.deep_layers
    assert tuple(stored.state.input_size) == tuple(preset.input_size)
    assert record.command.startswith("zmask fit --config experiments/") and record.fitted_on
    with pytest.raises(TypeError):
        record.metrics["lambda0"] = 0.0  # read-only metadata


def test_a_changed_or_missing_profile_is_refused(tmp_path, monkeypatch):
    record = get_preset("espnet_camvid").profile_record
    data = bytearray(record.path.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / record.file).write_bytes(bytes(data))
    monkeypatch.setattr(profiles_module, "PROFILE_FOLDER", tmp_path)
    with pytest.raises(ProfileError, match=rf"has SHA-256 .* expected {record.sha256[:8]}"):
        record.verified_path()
    missing = dataclasses.replace(record, file="nowhere.safetensors")
    with pytest.raises(ProfileError, match="missing from this installation"):
        missing.verified_path()


def test_a_preset_without_profile_says_how_to_get_one():
    with pytest.raises(ProfileError, match="no shipped profile.*zmask fit --model fcn_resnet50"):
        get_preset("fcn_resnet50").profile()


def test_profile_records_are_hashable_values():
    record = get_preset("yolov5n_coco").profile_record
    assert isinstance(record, ProfileRecord) and hash(record) == hash(dataclasses.replace(record))


def test_from_preset_defends_with_the_shipped_profile(assets):
    from zmask.attacks import load_patch
    from zmask.evaluation import place_patches

    preset = get_preset("espnet_camvid")
    defense = ZMask.from_preset("espnet_camvid")
    assert defense.state.threshold == pytest.approx(preset.profile_record.metrics["lambda0"], abs=5e-5)
    image = preset.dataset("val", limit=1)[0]["image"][None]
    patch = load_patch(profiles_module.PROFILE_FOLDER.parent / "patches" / "espnet_camvid_L_beta1.0.png")[0]
    attacked, _ = place_patches(image, patch, [0], 0)
    with torch.no_grad():
        flagged = defense.detect(torch.cat([image, attacked])).flagged.tolist()
    assert flagged == [False, True]


def test_from_preset_accepts_a_preset_object_and_passes_options(assets, tmp_path):
    preset = get_preset("espnet_camvid")
    defense = ZMask.from_preset(preset, pretrained=False, check_model=False)
    assert isinstance(defense, ZMask) and defense.config.layers == preset.config().layers
    copy = tmp_path / "copy.safetensors"
    shutil.copy(preset.profile(), copy)
    assert ZMask.load(copy, preset.build(False), check_model=False).state.threshold == defense.state.threshold
