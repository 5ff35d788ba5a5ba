"""Reproduce the Z-Mask authors' own outputs on their toy network (spec section 8)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from zmask import FittedState, FusionBlock, ZMask, detection_score
from zmask.core.refinement import layer_heatmap_direct

from ..toy import TOY_CONFIG, ToyNet


@pytest.fixture(scope="module")
def reference(assets):
    return load_file(str(assets / "reference" / "zmask_demo_reference_toy.safetensors"))


@pytest.fixture(scope="module")
def authors_fusion(assets):
    return FusionBlock.from_authors_checkpoint(assets / "reference" / "zmask_demo_fusion_bisenet.pth")


@pytest.fixture(scope="module")
def toy(reference):
    model = ToyNet()
    model.load_state_dict({k.removeprefix("state_dict."): v for k, v in reference.items() if k.startswith("state_dict.")})
    return model.eval()


def test_authors_checkpoint_values(authors_fusion):
    values = authors_fusion.values()
    assert values["a1"] == pytest.approx(0.8581, abs=1e-4)
    assert values["e2"] == pytest.approx(-1.4737, abs=1e-4)
    soft = authors_fusion(torch.tensor([0.0, 0.1, 0.2, 0.5]), torch.ones(4))
    assert torch.allclose(soft, torch.tensor([0.0053, 0.0588, 0.7467, 0.9489]), atol=2e-4)


def _ungated_analysis(defense, images, per_layer=False):
    """The authors' toy input is not an RGB image in [0, 1] (which ``detect`` insists on): the
    lower-level capture and analyze, which take any activations."""
    return defense.analyze(defense.capture(images)[1], tuple(images.shape[-2:]), gate=False, per_layer=per_layer)


@pytest.mark.parametrize("box_method", ["table", "separable", "auto"])
def test_reproduces_authors_outputs(reference, toy, authors_fusion, box_method):
    defense = ZMask(toy, TOY_CONFIG.replace(box_method=box_method), FittedState(fusion=authors_fusion))
    clean = reference["clean_images"]
    defense.fit_statistics([clean[i : i + 1] for i in range(clean.shape[0])])
    for layer in ("c1", "c2", "c3"):
        torch.testing.assert_close(defense.state.statistics[layer].mean.view(-1), reference[f"mean.{layer}"].view(-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(defense.state.statistics[layer].std.view(-1), reference[f"std.{layer}"].view(-1), rtol=0, atol=1e-6)
    with torch.no_grad():
        maps = _ungated_analysis(defense, reference["input"]).heatmaps
        soft = defense.state.fusion(maps.shallow, maps.deep)
        score = detection_score(maps.shallow, maps.deep, soft)
    torch.testing.assert_close(maps.shallow, reference["H_S"], rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.deep, reference["H_D"], rtol=0, atol=1e-5)
    torch.testing.assert_close(soft, reference["mask_soft"], rtol=0, atol=1e-5)
    torch.testing.assert_close(score, reference["score_d"].view(-1), rtol=0, atol=1e-5)


def test_fast_refinement_matches_direct_oracle(reference, toy, authors_fusion):
    defense = ZMask(toy, TOY_CONFIG, FittedState(fusion=authors_fusion))
    defense.fit_statistics([reference["clean_images"]])
    with torch.no_grad():
        maps = _ungated_analysis(defense, reference["input"], per_layer=True).heatmaps
        _, activations = defense.capture(reference["input"])
    for layer, sets in maps.per_layer.items():
        for name, heatmap in sets.items():
            kernels = TOY_CONFIG.shallow_kernels if name == "S" else TOY_CONFIG.deep_kernels
            direct = layer_heatmap_direct(activations[layer], defense.state.statistics[layer], kernels, TOY_CONFIG)
            torch.testing.assert_close(heatmap, direct, rtol=1e-5, atol=1e-6)
