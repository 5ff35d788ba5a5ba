"""The output change of a masked re-pass: what removing a region does to the prediction."""

from __future__ import annotations

import pytest
import torch

from zmask.core.effect import output_change
from zmask.errors import ZMaskTypeError


def test_segmentation_change_counts_changed_pixels_outside_the_mask_only():
    before = torch.zeros(2, 3, 4, 5)
    before[:, 0] = 1.0  # class 0 everywhere
    after = before.clone()
    after[0, 2, :2, :] = 5.0  # image 0: 10 of 20 pixels turn to class 2
    keep = torch.ones(2, 1, 8, 10)
    keep[0, :, :2, :] = 0.0  # the top quarter of image 0 (2 x 10 input pixels = 1 output row) was masked
    change = output_change(before, after, keep)
    assert change.tolist() == pytest.approx([5 / 20, 0.0])  # the masked output row does not count


def test_classification_change_is_whether_the_top_class_moved():
    before = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    after = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    assert output_change(before, after, torch.ones(2, 1, 4, 4)).tolist() == [1.0, 0.0]


def test_detection_change_weighs_boxes_without_a_match_by_their_score():
    car = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([3]), "scores": torch.tensor([0.8])}
    person = {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}
    both = {key: torch.cat([car[key], person[key]]) for key in car}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    keep = torch.ones(4, 1, 40, 40)
    keep[3, :, 15:35, 15:35] = 0.0  # image 3: the person's centre is masked
    change = output_change([car, both, car, both], [car, car, empty, car], keep)
    assert change.tolist() == pytest.approx([0.0, 0.5, 0.8, 0.0])
    relabelled = dict(car, labels=torch.tensor([4]))
    assert float(output_change([car], [relabelled], keep[:1])[0]) == pytest.approx(1.6)  # another class is not a match


def test_outputs_it_cannot_compare_are_refused_by_name():
    with pytest.raises(ZMaskTypeError, match="candidate_choice='effect'"):
        output_change({"logits": torch.zeros(1, 2)}, {"logits": torch.zeros(1, 2)}, torch.ones(1, 1, 2, 2))
    with pytest.raises(ZMaskTypeError, match="cannot be compared"):
        output_change(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4), torch.ones(1, 1, 3, 3))
