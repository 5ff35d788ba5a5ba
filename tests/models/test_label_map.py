"""Declared label maps: a segmenter trained on another label set is scored on the dataset's classes
through its preset's map, in the task (predictions, metric, attack losses), not by special cases."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zmask import ActivationCapture
from zmask.data.camvid import CAMVID_CLASSES, CAMVID_IGNORE_INDEX, CITYSCAPES_TO_CAMVID
from zmask.errors import InputError, ZMaskError
from zmask.models import PRESETS
from zmask.tasks import SegmentationTask
from zmask.tasks.segmentation import check_label_map, describe_label_map

# 5 model outputs -> 3 classes; output 4 is never scored (ignore index 9).
MAP = (2, 0, 0, 1, 9)


def _task(label_map=MAP, classes: int = 3) -> SegmentationTask:
    return SegmentationTask(torch.nn.Identity(), classes, 9, ("a", "b", "c")[:classes], label_map=label_map)


def test_predictions_are_mapped_argmax():
    task = _task()
    logits = torch.zeros(1, 5, 1, 5)
    for pixel, output in enumerate((0, 1, 2, 3, 4)):
        logits[0, output, 0, pixel] = 5.0
    assert task.predict(logits).tolist() == [[[2, 0, 0, 1, 9]]]
    assert SegmentationTask(torch.nn.Identity(), 5, 9).predict(logits).tolist() == [[[0, 1, 2, 3, 4]]]  # no map: identity


def test_metric_scores_mapped_predictions_and_counts_ignored_outputs_as_misses():
    task = _task()
    logits = torch.zeros(1, 5, 1, 4)
    logits[0, [1, 2, 3, 4], 0, [0, 1, 2, 3]] = 1.0  # predicts 0, 0, 1, ignored
    label = torch.tensor([[[0, 0, 1, 1]]])
    metric = task.metric()
    task.update_metric(metric, logits, {"label": label}, torch.zeros(1, 1, 1, 4))
    result = metric.compute()
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)  # the 'ignored' prediction is a miss
    assert result["class_iou"][:2] == pytest.approx([1.0, 0.5])


def test_class_logits_sum_probabilities_of_each_class():
    torch.manual_seed(0)
    task = _task()
    logits = torch.randn(2, 5, 3, 4)
    merged = task.class_logits(logits)
    assert merged.shape == (2, 4, 3, 4)  # 3 classes + one column for the ignored output
    probabilities = logits.softmax(1)
    expected = torch.stack([probabilities[:, [1, 2]].sum(1), probabilities[:, 3], probabilities[:, 0], probabilities[:, 4]], 1)
    torch.testing.assert_close(merged.softmax(1), expected)
    labels = torch.tensor([0, 1, 2, 9]).repeat(2, 3, 1)
    loss = task.pixel_loss(logits, labels)
    torch.testing.assert_close(loss[..., 0], -expected[:, 0, :, 0].log())
    assert torch.all(loss[..., 3] == 0)  # ignore_index pixels


def test_attack_terms_are_finite_with_a_class_no_output_reaches():
    task = _task(label_map=(0, 0, 1), classes=3)  # class 2 is unreachable
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 2]]).repeat(4, 1)[None]
    terms = task.attack_terms(logits, {"label": labels}, torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), 1.0)
    total = sum(weight * value for weight, value in terms.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()
    assert torch.isfinite(task.pixel_loss(logits, labels)).all()


@pytest.mark.parametrize("bad, message", [
    ((0, 3), "neither an evaluated class"), ((0, 1.0), "must be an int"), ((), "non-empty"), ("012", "non-empty"),
])
def test_bad_label_maps_are_refused(bad, message):
    with pytest.raises(InputError, match=message):
        check_label_map(bad, 3, 9)


def test_logits_that_do_not_match_the_map_are_refused():
    with pytest.raises(InputError, match="5 entries"):
        _task().predict(torch.zeros(1, 4, 2, 2))


def test_describe_label_map_names_each_class_and_the_ignored_outputs():
    lines = describe_label_map(MAP, ("o0", "o1", "o2", "o3", "o4"), ("a", "b", "c"), 9)
    assert lines == ["a <- o1, o2", "b <- o3", "c <- o0", "(ignored) <- o4"]


def test_cityscapes_presets_declare_the_map_and_cgnet_needs_none():
    for name in ("espnetv2_camvid", "dicenet_camvid"):
        preset = PRESETS[name]
        assert preset.label_map == CITYSCAPES_TO_CAMVID and len(preset.output_classes) == 20
        assert preset.num_classes == 11 and preset.ignore_index == CAMVID_IGNORE_INDEX and preset.class_names == CAMVID_CLASSES
        assert "Car <- car, truck, bus, train" in preset.label_map_lines()
        assert preset.label_map_lines()[-1] == "(ignored) <- background"
        assert preset.task_for(torch.nn.Identity()).label_map == CITYSCAPES_TO_CAMVID
        assert all(side % 16 == 0 for side in preset.input_size)
    cgnet = PRESETS["cgnet_camvid"]
    assert cgnet.label_map is None and cgnet.label_map_lines() == [] and "optimistic" in cgnet.description
    with pytest.raises(ZMaskError):
        dataclasses.replace(PRESETS["espnetv2_camvid"], label_map=(0, 12))


@pytest.mark.parametrize("name", ["espnetv2_camvid", "dicenet_camvid", "cgnet_camvid"])
def test_new_presets_build_run_and_read_each_layer_once(name):
    preset = PRESETS[name]
    torch.manual_seed(0)
    model = preset.build(False)
    with torch.no_grad(), ActivationCapture(model, preset.config().layers) as capture:
        output = model(torch.rand(1, 3, *preset.input_size))
    assert not capture.missing()
    outputs = len(preset.label_map) if preset.label_map else preset.num_classes
    assert output.shape == (1, outputs, *preset.input_size)
    assert preset.task_for(model).predict(output).max() <= max(preset.num_classes - 1, preset.ignore_index)
