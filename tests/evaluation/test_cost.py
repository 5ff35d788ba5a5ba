"""The cost-aware fit: the heatmap grid chosen under a budget of defended clean frame / forward."""

from __future__ import annotations

import pytest

from zmask import FusionTraining
from zmask.errors import ConfigError
from zmask.evaluation import FitPlan, fit_zmask
from zmask.evaluation.cost import choose_heatmap, heatmap_candidates, measure_grids

from ..toy import TOY_CONFIG
from .test_evaluation import toy_setup  # noqa: F401 - the shared module fixture


def test_heatmap_candidates_halve_down_to_the_minimum():
    assert heatmap_candidates((320, 320)) == [(320, 320), (160, 160), (80, 80), (40, 40)]
    assert heatmap_candidates((48, 64), minimum=16) == [(48, 64), (24, 32)]
    assert heatmap_candidates((20, 20), minimum=16) == [(20, 20)]


def test_grid_change_keeps_the_kernels_fraction_of_the_grid():
    half = TOY_CONFIG.at_heatmap((TOY_CONFIG.heatmap_size[0] // 2, TOY_CONFIG.heatmap_size[1] // 2))
    assert half.heatmap_size == (TOY_CONFIG.heatmap_size[0] // 2, TOY_CONFIG.heatmap_size[1] // 2)
    for (kh, kw), (hh, hw) in zip(TOY_CONFIG.shallow_kernels, half.shallow_kernels):
        assert abs(hh - kh / 2) <= 0.5 and abs(hw - kw / 2) <= 0.5 and hh >= 1 and hw >= 1
    assert TOY_CONFIG.at_heatmap(TOY_CONFIG.heatmap_size) is TOY_CONFIG


def test_choice_respects_the_budget_and_reports_every_grid(toy_setup):  # noqa: F811
    model, _, dataset, _ = toy_setup
    image = dataset[0]["image"][None]
    costs = measure_grids(model, [TOY_CONFIG, TOY_CONFIG.at_heatmap((24, 32))], image, repeats=3)
    assert [c.heatmap_size for c in costs] == [TOY_CONFIG.heatmap_size, (24, 32)]
    assert all(c.forward_ms > 0 and c.defended_clean_ms > 0 for c in costs)
    generous = choose_heatmap(model, TOY_CONFIG, image, max_overhead=1e6, repeats=3)
    assert generous.chosen == TOY_CONFIG.heatmap_size and generous.within_budget  # the finest grid when every grid fits
    impossible = choose_heatmap(model, TOY_CONFIG, image, max_overhead=1e-9, repeats=3)
    assert not impossible.within_budget  # nothing is as cheap as the bare forward: the cheapest, said so
    assert impossible.chosen == min(impossible.grids, key=lambda c: c.clean_over_forward).heatmap_size
    with pytest.raises(ConfigError, match="max_overhead"):
        choose_heatmap(model, TOY_CONFIG, image, max_overhead=0.0)


def test_fit_with_a_budget_records_the_grid_and_the_evidence(toy_setup):  # noqa: F811
    model, _, dataset, patches = toy_setup
    grids = (TOY_CONFIG.heatmap_size, (24, 32))
    plan = FitPlan(statistics_images=3, fusion_images=3, calibration_images=2, batch_size=4, placements=4, selection_images=3,
                   fusion=FusionTraining(epochs=2, batch_size=4, learning_rate=0.05), max_overhead=1e-9, heatmap_candidates=grids)
    defense, report = fit_zmask(model, TOY_CONFIG, dataset, patches, plan, progress=False)
    cost = report["cost"]
    chosen = tuple(cost["chosen"])
    assert chosen in grids and defense.config.heatmap_size == chosen and tuple(report["heatmap_size"]) == chosen
    assert defense.state.provenance["fit"]["cost"] == cost  # stored in the profile with the rest of the fit
    assert {tuple(g["heatmap_size"]) for g in cost["grids"]} == set(grids)
    for layer in TOY_CONFIG.layers:
        assert set(cost["evidence"][layer]) == {f"{h}x{w}" for h, w in dict.fromkeys([TOY_CONFIG.heatmap_size, chosen])}
