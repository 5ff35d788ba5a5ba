"""The physical-conditions proxy: seeded, bounded, a perspective footprint, clear errors."""

from __future__ import annotations

import pytest
import torch

from zmask.attacks import EOTConfig, PhysicalConditions, apply_patch
from zmask.errors import ConfigError


def test_physical_conditions_are_seeded_and_bounded():
    patch = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(0))
    footprint = torch.ones(1, 40, 60)
    conditions = PhysicalConditions()
    first = conditions(patch, footprint, torch.Generator().manual_seed(1))
    again = conditions(patch, footprint, torch.Generator().manual_seed(1))
    other = conditions(patch, footprint, torch.Generator().manual_seed(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    piece, mask = first
    assert piece.shape == patch.shape and mask.shape == footprint.shape
    assert piece.min() >= 0 and piece.max() <= 1 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.6 < mask.mean() < 1.0  # the perspective view is no longer the full rectangle
    inside = piece[:, mask[0] > 0]
    assert inside.min() >= 0.0 and (piece - patch).abs().mean() > 0.02  # print, light, blur and JPEG changed it


def test_physical_conditions_off_is_the_printed_patch():
    patch = (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    off = PhysicalConditions(print_gamut=(0.0, 1.0), print_gamma=(1.0, 1.0), brightness=0.0, contrast=0.0, colour_gain=0.0,
                             perspective=0.0, blur_sigma=(0.0, 0.0), jpeg_quality=(100, 100))
    piece, mask = off(patch, torch.ones(1, 16, 16), torch.Generator().manual_seed(0))
    torch.testing.assert_close(piece, patch, rtol=0, atol=1e-6)
    assert mask.min() == 1


def test_apply_patch_uses_the_transformed_footprint_as_the_mask():
    images = torch.zeros(2, 3, 64, 80)
    placed = apply_patch(images, torch.ones(3, 30, 30), torch.Generator().manual_seed(0), EOTConfig.none(), transform=PhysicalConditions(perspective=0.3))
    areas = placed.masks.flatten(1).sum(1)
    assert (areas < 900).all() and (areas > 300).all()
    assert torch.all(placed.images[:, :, placed.masks[0, 0] == 0][0] == 0)  # nothing pasted outside the footprint


@pytest.mark.parametrize("field,value", [("print_gamut", (0.9, 0.1)), ("jpeg_quality", (0, 90)), ("perspective", 0.5), ("brightness", 2.0)])
def test_physical_conditions_reject_bad_ranges(field, value):
    with pytest.raises(ConfigError, match=field):
        PhysicalConditions(**{field: value})


def test_physical_conditions_on_a_grey_patch():
    piece, mask = PhysicalConditions()(torch.rand(1, 20, 20), torch.ones(1, 20, 20), torch.Generator().manual_seed(0))
    assert piece.shape == (1, 20, 20) and 0 <= piece.min() and piece.max() <= 1
