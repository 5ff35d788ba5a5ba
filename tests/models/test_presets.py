"""Every preset builds (random weights), runs, and names layers that exist; wrappers behave."""

from __future__ import annotations

import pytest
import torch

from zmask import ActivationCapture, ZMaskError
from zmask.models import PRESETS, letterbox, scale_boxes, yolov5n
from zmask.models.torchvision_models import build_detector

LOCAL = {"espnet_camvid", "espnet_cityscapes", "yolov5n_coco"}


@pytest.mark.parametrize("name", sorted(set(PRESETS) - LOCAL))
def test_torchvision_presets_build_run_and_name_real_layers(name):
    preset = PRESETS[name]
    torch.manual_seed(0)
    model = preset.build(False)
    config = preset.config()
    with torch.no_grad(), ActivationCapture(model, config.layers) as capture:
        output = model(torch.rand(1, 3, *preset.input_size))
    assert not capture.missing()
    for activation in capture.activations.values():
        assert activation.dim() == 4
    if preset.task == "detection":
        assert isinstance(output, list) and set(output[0]) >= {"boxes", "labels", "scores"}
    else:
        outputs = len(preset.label_map) if preset.label_map else preset.num_classes  # a label map scores K outputs as its classes
        assert output.shape[:2] == (1, outputs) and output.shape[-2:] == preset.input_size


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_project_presets_layers_exist(name, assets):
    preset = PRESETS[name]
    model = preset.build(True)
    with torch.no_grad(), ActivationCapture(model, preset.config().layers) as capture:
        model(torch.rand(1, 3, *preset.input_size))
    assert not capture.missing()


def test_torchvision_detector_objective_is_differentiable():
    torch.manual_seed(0)
    detector = build_detector("fasterrcnn_resnet50_fpn")
    images = torch.rand(1, 3, 256, 320, requires_grad=True)
    target = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0]]), "labels": torch.tensor([1])}]
    loss = detector.objective(images, target)
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not detector.model.training
    with pytest.raises(ZMaskError, match="multiples of 32"):
        detector(torch.rand(1, 3, 250, 320))


def test_yolov5_objectives_and_letterbox(assets):
    model = yolov5n()
    image = torch.rand(3, 480, 640)
    boxed, geometry = letterbox(image, 640, auto=True)
    assert boxed.shape[-2:] == (480, 640) and geometry.gain == 1.0
    boxed, geometry = letterbox(torch.rand(3, 300, 500), 640, auto=False)
    assert boxed.shape[-2:] == (640, 640)
    box = torch.tensor([[0.0, 0.0, 500.0, 300.0]]) * geometry.gain + torch.tensor([geometry.pad_w, geometry.pad_h] * 2)
    torch.testing.assert_close(scale_boxes(box, geometry), torch.tensor([[0.0, 0.0, 500.0, 300.0]]), rtol=0, atol=1e-3)
    images = torch.rand(1, 3, 320, 320, requires_grad=True)
    targets = [{"boxes": torch.tensor([[50.0, 50.0, 250.0, 250.0]]), "labels": torch.tensor([1])}]
    for kind in ("untargeted", "vanishing"):
        value = model.objective(images, targets, kind)
        (grad,) = torch.autograd.grad(value, images)
        assert torch.isfinite(value) and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not COCO category ids"):
        model.objective(images, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([12])}])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 300, 300))


def test_segmenter_wrapper_takes_num_classes_and_normalisation():
    from zmask import ConfigError
    from zmask.models import TorchvisionSegmenter, build_segmenter

    torch.manual_seed(0)
    model = build_segmenter("lraspp_mobilenet_v3_large", pretrained=False, num_classes=11, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(images)
        inner = model.model((images - 0.5) / 0.25)["out"]
    assert logits.shape == (2, 11, 64, 96) and torch.equal(logits, inner)  # the given normalisation is applied inside
    with pytest.raises(ConfigError, match="predict 21 classes, not 11"):
        build_segmenter("lraspp_mobilenet_v3_large", pretrained=True, num_classes=11)  # refused before any download
    with pytest.raises(ConfigError, match="std must be positive"):
        TorchvisionSegmenter(torch.nn.Identity(), std=(0.0, 1.0, 1.0))
    plain = TorchvisionSegmenter(torch.nn.Conv2d(3, 4, 1), mean=(0.0,), std=(1.0,))  # a model returning a tensor is wrapped too
    assert plain(images).shape == (2, 4, 64, 96)
