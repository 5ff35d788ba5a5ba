"""Automatic layer selection: candidates, the choice rule, and the end-to-end choice on training data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zmask.errors import ConfigError
from zmask.evaluation import FitPlan
from zmask.evaluation import LayerEvidence, LayerSelection, candidate_layers, choose_layers, fit_zmask, select_layers

from ..toy import TOY_CONFIG, clean_batches, patched_batch, seeded_toy


class Blocks(nn.Module):
    """Two conv blocks (containers whose output is their last child's tensor) and a coarse head."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 3, 16, 1)  # 1/32 resolution: beyond the default bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def test_candidate_layers_bound_resolution_and_merge_containers():
    candidates = candidate_layers(Blocks().eval(), torch.rand(1, 3, 64, 64))
    assert candidates == ["block1.0", "block1", "block2.0", "block2"]  # ReLU outputs count under their block's name
    assert candidate_layers(Blocks().eval(), torch.rand(1, 3, 64, 64), max_candidates=2) == ["block1.0", "block2.0"]
    assert "head" in candidate_layers(Blocks().eval(), torch.rand(1, 3, 64, 64), max_stride=64)
    with pytest.raises(ConfigError):
        candidate_layers(Blocks(), torch.rand(1, 3, 8, 8), max_stride=0)


def test_candidate_layers_leave_out_modules_run_twice():
    class Shared(nn.Module):  # one activation module used by two branches (as NanoDet's head)
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.left, self.right, self.act = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x):
            x = self.stem(x)
            return self.act(self.left(x)) + self.act(self.right(x))

    candidates = candidate_layers(Shared().eval(), torch.rand(1, 3, 32, 32))
    assert "act" not in candidates and {"stem", "left", "right"} <= set(candidates)


def _evidence(layer, auc, localisation, cost=1.0):
    return LayerEvidence(layer, (8, 4, 4), auc, localisation, cost)


def test_choose_layers_rule():
    evidence = [_evidence("a", 0.99, 1.5), _evidence("b", 0.95, 4.0), _evidence("c", 0.7, 9.0), _evidence("d", 0.9, 2.0, cost=5.0),
                _evidence("e", 0.9, 2.0, cost=1.0)]
    chosen = choose_layers(evidence, shallow_count=2, deep_count=2, min_auc=0.8)
    assert chosen.shallow == ("b", "e")  # best localisation among AUC >= 0.8 ("c" localises but does not separate); cost breaks the tie
    assert chosen.deep == ("a", "b")
    assert LayerSelection.from_dict(chosen.to_dict()) == chosen
    assert "| b |" in chosen.table() and "S" in chosen.table()
    with pytest.raises(ConfigError, match="usable evidence"):
        choose_layers([_evidence("x", float("nan"), 1.0)])


def test_select_layers_on_the_toy_prefers_layers_that_see_the_patch():
    model = seeded_toy()
    statistics_images = [{"image": image} for batch in clean_batches(4, 4, seed=3) for image in batch]
    held_out = [{"image": image} for batch in clean_batches(2, 4, seed=4) for image in batch]
    patched = [patched_batch(4, seed=s) for s in range(3)]
    selection = select_layers(model, TOY_CONFIG, statistics_images, held_out, patched, shallow_count=2, deep_count=1, progress=False)
    assert {e.layer for e in selection.evidence} == {"c1", "c2", "c3"}
    assert len(selection.shallow) == 2 and len(selection.deep) == 1
    best = max(selection.evidence, key=lambda e: (e.auc, e.localisation))  # the rule's order (ties: localisation)
    assert best.auc > 0.9 and selection.deep == (best.layer,)
    assert all(e.cost_ms > 0 for e in selection.evidence)


def test_fit_with_auto_layers_records_the_choice():
    from zmask import FusionTraining

    model = seeded_toy()
    images = torch.cat(clean_batches(4, 4, seed=3))
    dataset = [{"image": image} for image in images]
    patches = [(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(s)) > 0.5).float() for s in range(2)]
    plan = FitPlan(statistics_images=6, fusion_images=6, calibration_images=4, batch_size=4, placements=2,
                   fusion=FusionTraining(epochs=2, batch_size=4, learning_rate=0.05), auto_layers=True)
    defense, report = fit_zmask(model, TOY_CONFIG, dataset, patches, plan, progress=False)
    chosen = report["layer_selection"]
    assert defense.config.shallow_layers == tuple(chosen["shallow"]) and defense.config.deep_layers == tuple(chosen["deep"])
    assert defense.state.provenance["fit"]["layer_selection"] == chosen


def test_layer_evidence_is_the_same_in_groups_and_refuses_an_empty_list():
    from zmask.evaluation import layer_evidence

    model = seeded_toy()
    statistics_images = [{"image": image} for batch in clean_batches(2, 4, seed=3) for image in batch]
    held_out = [{"image": image} for batch in clean_batches(1, 4, seed=4) for image in batch]
    patched = [patched_batch(4, seed=s) for s in range(2)]
    together = layer_evidence(model, ["c1", "c2", "c3"], TOY_CONFIG, statistics_images, held_out, patched, progress=False)
    one_by_one = layer_evidence(model, ["c1", "c2", "c3"], TOY_CONFIG, statistics_images, held_out, patched, layers_at_once=1, progress=False)
    assert [(e.layer, e.auc, e.localisation) for e in together] == [(e.layer, e.auc, e.localisation) for e in one_by_one]
    with pytest.raises(ConfigError, match="no candidate layers"):
        layer_evidence(model, [], TOY_CONFIG, statistics_images, held_out, patched, progress=False)


def test_fit_reports_the_mask_quality_and_can_calibrate_the_mask_threshold():
    from zmask import FusionTraining

    model = seeded_toy()
    dataset = [{"image": image} for image in torch.cat(clean_batches(4, 4, seed=3))]
    patches = [(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(s)) > 0.5).float() for s in range(2)]
    reports = {}
    for calibrate in (False, True):
        plan = FitPlan(statistics_images=6, fusion_images=6, calibration_images=4, batch_size=4, placements=2,
                       fusion=FusionTraining(epochs=2, batch_size=4, learning_rate=0.05), calibrate_mask=calibrate)
        defense, reports[calibrate] = fit_zmask(model, TOY_CONFIG, dataset, patches, plan, progress=False)
        assert defense.config.mask_threshold == reports[calibrate]["mask_threshold"]
    assert reports[False]["mask_threshold"] == TOY_CONFIG.mask_threshold
    assert 0.0 <= reports[False]["calibration_mask_iou"] <= reports[True]["calibration_mask_iou"] <= 1.0
