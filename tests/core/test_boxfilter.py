"""The fast box filters agree with avg_pool2d for every kernel of the spec's tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zmask.config import (
    PAPER_DETECTION_DEEP_KERNELS,
    PAPER_DETECTION_HEATMAP,
    PAPER_DETECTION_SHALLOW_KERNELS,
    PAPER_SEGMENTATION_DEEP_KERNELS,
    PAPER_SEGMENTATION_HEATMAP,
    PAPER_SEGMENTATION_SHALLOW_KERNELS,
    ZMaskConfig,
)
from zmask.core.boxfilter import Workspace, box_filter, box_mean_from_table, box_mean_separable, separable_layout, summed_area_table
from zmask.core.geometry import axis_windows, legacy_nearest_indices, separable_axis, window_weights
from zmask.core.refinement import avg_pool_direct, build_plan, layer_cost, layer_heatmap_direct, LayerRefiner
from zmask.core.statistics import LayerStatistics

SEGMENTATION = [(k, PAPER_SEGMENTATION_HEATMAP) for k in dict.fromkeys(PAPER_SEGMENTATION_SHALLOW_KERNELS + PAPER_SEGMENTATION_DEEP_KERNELS)]
DETECTION = [(k, PAPER_DETECTION_HEATMAP) for k in dict.fromkeys(PAPER_DETECTION_SHALLOW_KERNELS + PAPER_DETECTION_DEEP_KERNELS)]
EDGE = [((48, 64), (48, 64)), ((1, 1), (7, 9)), ((7, 9), (7, 9)), ((3, 2), (11, 5))]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation relative to the largest value of the expected map.

    Expected maps come from avg_pool2d in float64: float32 avg_pool2d itself deviates from the exact
    mean by up to ~3e-5 of the map's range for the paper's largest kernels (8192-term sums).
    """
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("legacy_size", [(5, 12), (12, 5), (150, 87), (87, 150), (300, 300), (16, 150)])
def test_legacy_nearest_indices_match_interpolate(legacy_size):
    in_size, out_size = legacy_size
    ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
    expected = F.interpolate(ramp, size=(out_size, 1), mode="nearest").view(-1).long()
    assert torch.equal(legacy_nearest_indices(in_size, out_size), expected)


@pytest.mark.parametrize("kernel,size", SEGMENTATION + DETECTION + EDGE)
def test_summed_area_table_equals_avg_pool(kernel, size):
    generator = torch.Generator().manual_seed(sum(kernel) + sum(size))
    # A large offset makes float32 tables lose digits; the float64 table must not.
    grid = torch.randn(2, 3, *size, generator=generator) * 3 + 50
    expected = avg_pool_direct(grid.double(), kernel, "valid_stretch")
    rows, cols = axis_windows(size[0], kernel[0], "valid_stretch"), axis_windows(size[1], kernel[1], "valid_stretch")
    compact = box_mean_from_table(summed_area_table(grid), rows, cols)
    actual = compact.index_select(-2, rows.inverse).index_select(-1, cols.inverse)
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("kernel,size", SEGMENTATION[:2] + DETECTION[:2] + EDGE)
def test_same_pooling_equals_padded_avg_pool(kernel, size):
    grid = torch.randn(1, 2, *size, generator=torch.Generator().manual_seed(3))
    rows, cols = axis_windows(size[0], kernel[0], "same"), axis_windows(size[1], kernel[1], "same")
    compact = box_mean_from_table(summed_area_table(grid), rows, cols)
    actual = compact.index_select(-2, rows.inverse).index_select(-1, cols.inverse)
    assert actual.shape[-2:] == grid.shape[-2:]
    assert relative_error(actual, avg_pool_direct(grid.double(), kernel, "same")) <= 1e-5


@pytest.mark.parametrize("native", [(16, 32), (75, 150), (256, 512), (150, 300)])
@pytest.mark.parametrize("kernel", [(64, 128), (8, 16), (150, 300)])
def test_separable_weights_equal_resize_then_pool(native, kernel):
    size = (150, 300)
    native_map = torch.randn(1, 4, *native, generator=torch.Generator().manual_seed(5))
    grid = F.interpolate(native_map.double(), size=size, mode="nearest")
    expected = avg_pool_direct(grid, kernel, "valid_stretch")
    rows, cols = axis_windows(size[0], kernel[0], "valid_stretch"), axis_windows(size[1], kernel[1], "valid_stretch")
    row_w = window_weights(rows, legacy_nearest_indices(native[0], size[0]), native[0]).float()
    col_w = window_weights(cols, legacy_nearest_indices(native[1], size[1]), native[1]).float()
    compact = box_mean_separable(separable_layout(native_map), tuple(native_map.shape), row_w, col_w, Workspace())
    actual = compact.permute(1, 2, 0, 3).index_select(-2, rows.inverse).index_select(-1, cols.inverse)
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("variant", ["reference", "paper"])
@pytest.mark.parametrize("pooling", ["valid_stretch", "same"])
@pytest.mark.parametrize("method", ["table", "separable"])
@pytest.mark.parametrize("planes", [1, 3])
def test_layer_heatmaps_match_direct(variant, pooling, method, planes):
    config = ZMaskConfig(
        shallow_layers=("a",), deep_layers=("a",), shallow_kernels=((24, 30), (12, 15), (6, 8)),
        deep_kernels=((24, 30), (12, 15)), heatmap_size=(45, 60), spr_variant=variant, pooling=pooling,
        box_method=method, planes=planes, chunk_elements=2 * 45 * 60 * 5,
    )
    generator = torch.Generator().manual_seed(11)
    activation = torch.randn(2, 12, 23, 31, generator=generator)
    activation[:, :, 5:12, 7:15] += 4.0
    stats = LayerStatistics(torch.randn(12, planes, generator=generator) * 0.1, torch.rand(12, planes, generator=generator) + 0.5)
    maps = LayerRefiner(config).heatmaps(activation, stats, {"S": config.shallow_kernels, "D": config.deep_kernels})
    for name, kernels in (("S", config.shallow_kernels), ("D", config.deep_kernels)):
        expected = layer_heatmap_direct(activation.double(), stats, kernels, config)
        assert maps[name].shape == (2, 1, 45, 60)
        assert relative_error(maps[name], expected) <= 1e-5


def test_refinement_is_differentiable():
    config = ZMaskConfig(shallow_layers=("a",), deep_layers=("a",), shallow_kernels=((8, 8), (4, 4)), deep_kernels=((8, 8),), heatmap_size=(16, 16))
    activation = torch.randn(1, 3, 8, 8, requires_grad=True)
    stats = LayerStatistics(torch.zeros(3, 1), torch.ones(3, 1))
    maps = LayerRefiner(config).heatmaps(activation, stats, {"S": config.shallow_kernels})
    maps["S"].sum().backward()
    assert activation.grad is not None and activation.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(150, 300), (48, 64), (9, 7)])
def test_box_filter_shares_one_table_and_equals_avg_pool(size):
    kernels = [k for k in PAPER_SEGMENTATION_SHALLOW_KERNELS + ((size[0], size[1]), (1, 1), (3, 5)) if k[0] <= size[0] and k[1] <= size[1]]
    grid = torch.randn(2, 5, *size, generator=torch.Generator().manual_seed(2)) * 4 + 20
    for kernel, actual in zip(kernels, box_filter(grid, kernels)):
        assert relative_error(actual, F.avg_pool2d(grid.double(), kernel, stride=1)) <= 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        box_filter(grid, [(size[0] + 1, 1)])


def test_summed_area_table_with_and_without_gradients_agree():
    grid = torch.randn(1, 2, 13, 17)
    plain = summed_area_table(grid)
    tracked = summed_area_table(grid.clone().requires_grad_())
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=1e-12)
    assert plain[..., 0, :].abs().max() == 0 and plain[..., :, 0].abs().max() == 0


@pytest.mark.parametrize("native", [(24, 30), (48, 60), (96, 120), (24, 120)])
def test_integer_resample_path_is_bitwise_the_interpolate_path(native):
    """Layers whose size is an integer factor of the heatmap take the Z-score on the smaller grid and
    broadcast it into the table; the heatmaps are bit for bit those of resizing first."""
    import dataclasses

    from zmask.core import refinement

    config = ZMaskConfig(shallow_layers=("a",), deep_layers=("a",), shallow_kernels=((24, 30), (6, 8)), deep_kernels=((24, 30),),
                         heatmap_size=(48, 60), pooling="same", box_method="table")
    generator = torch.Generator().manual_seed(2)
    activation = torch.randn(2, 5, *native, generator=generator)
    stats = LayerStatistics(torch.randn(5, 1, generator=generator) * 0.1, torch.rand(5, 1, generator=generator) + 0.5)
    kernels = {"S": config.shallow_kernels, "D": config.deep_kernels}
    refiner = LayerRefiner(config)
    assert refiner.plan(native, list(dict.fromkeys(config.shallow_kernels + config.deep_kernels)), activation.device).resample is not None
    fast = refiner.heatmaps(activation, stats, kernels)
    plain = LayerRefiner(config)
    plain._plans = {key: dataclasses.replace(plan, resample=None) for key, plan in refiner._plans.items()}
    slow = plain.heatmaps(activation, stats, kernels)
    for name in kernels:
        assert torch.equal(fast[name], slow[name])
        expected = refinement.layer_heatmap_direct(activation.double(), stats, kernels[name], config)
        assert relative_error(fast[name], expected) <= 1e-5


@pytest.mark.parametrize("native, grid", [((90, 120), (90, 120)), ((45, 60), (90, 120)), ((180, 240), (45, 60))])
def test_auto_switches_evaluator_at_the_cost_models_break_even(native, grid):
    kernels = ((19, 26), (5, 6))
    config = ZMaskConfig(shallow_layers=("a",), deep_layers=("a",), shallow_kernels=kernels, deep_kernels=kernels[:1],
                         heatmap_size=grid, pooling="same", spr_variant="reference")
    cost = layer_cost(native, config, kernels)
    break_even = cost.break_even()
    assert 0 < break_even < float("inf")
    assert cost.method(break_even * 1.01) == "separable" and cost.method(break_even * 0.99) == "table"
    expected = cost.method()
    assert build_plan(native, config, kernels, torch.device("cpu")).method == expected


@pytest.mark.parametrize("method", ["table", "separable"])
@pytest.mark.parametrize("chunk_elements, chunks, images_per_pass", [(46 * 61 * 5, 3, 1), (46 * 61 * 13 * 2, 1, 2)])
def test_an_images_heatmap_does_not_depend_on_its_batch(method, chunk_elements, chunks, images_per_pass):
    """Channel chunks are those of one image and images go through in groups: every image of a
    batch gets exactly the heatmap it gets alone."""
    kernels = ((19, 26), (5, 6))
    config = ZMaskConfig(shallow_layers=("a",), deep_layers=("a",), shallow_kernels=kernels, deep_kernels=kernels[:1],
                         heatmap_size=(45, 60), pooling="same", box_method=method, spr_variant="reference", chunk_elements=chunk_elements)
    generator = torch.Generator().manual_seed(0)
    activation = torch.randn(5, 13, 90, 120, generator=generator)
    stats = LayerStatistics(torch.randn(13, 1, generator=generator), torch.rand(13, 1, generator=generator) + 0.5)
    refiner = LayerRefiner(config)
    plan = refiner.plan((90, 120), list(kernels), torch.device("cpu"))
    if method == "table":  # the separable intermediate is smaller: fewer chunks, more images a pass
        assert len(refiner._chunks(plan, 13)) == chunks and refiner._images_per_pass(plan, 13, torch.device("cpu")) == images_per_pass
    together = refiner.heatmaps(activation, stats, {"S": kernels})["S"]
    alone = torch.cat([refiner.heatmaps(activation[i : i + 1], stats, {"S": kernels})["S"] for i in range(5)])
    assert torch.equal(together, alone)
