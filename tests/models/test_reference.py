"""The project's ESPNet and YOLOv5n reproduce the upstream reference outputs and scores."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch.utils.data import DataLoader

from zmask.data import CamVid, CocoDetection, read_image
from zmask.models import espnet, yolov5n
from zmask.tasks import CocoEvaluator, SegmentationTask


@pytest.fixture(scope="module")
def espnet_reference(assets):
    return json.loads((assets / "reference" / "espnet_reference.json").read_text())


@pytest.fixture(scope="module")
def yolo_reference(assets):
    return json.loads((assets / "reference" / "yolov5n_reference.json").read_text())["yolov5n_coco"]


def _check_espnet_sample(model, image, sample):
    with torch.no_grad():
        logits = model(image[None])[0]
    assert list(logits.shape) == sample["output_shape"]
    for key, expected in sample["logits_at"].items():
        row, col = (int(v) for v in key.split(","))
        torch.testing.assert_close(logits[:, row, col], torch.tensor(expected), rtol=0, atol=1e-3)
    prediction = logits.argmax(0)
    assert torch.bincount(prediction.flatten(), minlength=logits.shape[0]).tolist() == sample["argmax_class_counts"]
    assert hashlib.sha256(prediction.to(torch.uint8).numpy().tobytes()).hexdigest() == sample["argmax_sha256"]


def test_espnet_camvid_reference_samples(assets, espnet_reference):
    model = espnet("camvid")
    for sample in espnet_reference["espnet_camvid"]["samples"]:
        _check_espnet_sample(model, read_image(assets / sample["image"]), sample)


def test_espnet_cityscapes_reference_sample(assets, espnet_reference):
    sample = espnet_reference["espnet_cityscapes"]["sample"]
    _check_espnet_sample(espnet("cityscapes"), read_image(assets / "reference" / "espnet_cityscapes_input_0.png"), sample)


def test_espnet_camvid_val_miou(assets, espnet_reference):
    """The upstream protocol (void labels and void predictions left out) through our dataset + metric."""
    expected = espnet_reference["espnet_camvid"]["val_split"]
    model = espnet("camvid")
    task = SegmentationTask(model, 11, 11)
    upstream, strict = task.metric(ignore_prediction=11), task.metric()
    dataset = CamVid(assets / "camvid", "val")
    assert len(dataset) == expected["images"]
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=8):
            prediction = task.predict(model(batch["image"]))
            upstream.update(prediction, batch["label"])
            strict.update(prediction, batch["label"])
    result = upstream.compute()
    assert result["miou"] == pytest.approx(expected["miou_11_classes"], abs=0.005)
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=0.005)
    assert strict.compute()["miou"] < result["miou"]  # void predictions count as misses by default


def test_yolov5n_reference_outputs(assets, yolo_reference):
    model = yolov5n()
    assert sum(p.numel() for p in model.parameters()) == 1_872_157
    for index, sample in enumerate(yolo_reference["samples"]):
        image = read_image(assets / "reference" / f"yolov5n_input_{index}.png")[None]
        with torch.no_grad():
            decoded, raw = model.raw(image)
            detections = model(image)[0]
        assert list(decoded.shape) == sample["decoded_shape"]
        for level, stats in zip(raw, sample["raw_head_stats"]):
            assert float(level.mean()) == pytest.approx(stats["mean"], abs=1e-3)
            assert float(level.std()) == pytest.approx(stats["std"], abs=1e-3)
        top = decoded[0][decoded[0][:, 4].argsort(descending=True)[:5]]
        for row, expected in zip(top, sample["top5_decoded_rows_xywh_obj_cls80"]):
            torch.testing.assert_close(row[:4], torch.tensor(expected[:4]), rtol=0, atol=0.5)
            assert float(row[4]) == pytest.approx(expected[4], abs=1e-3)
            assert int(row[5:].argmax()) == expected[6]
        expected_nms = sample["nms_conf0.25_iou0.45"]
        assert len(detections["boxes"]) == len(expected_nms)
        for box, score, label, expected in zip(detections["boxes"], detections["scores"], detections["labels"], expected_nms):
            torch.testing.assert_close(box, torch.tensor(expected["xyxy"]), rtol=0, atol=0.5)
            assert float(score) == pytest.approx(expected["score"], abs=1e-3)
            assert model.names[list(model.coco_ids).index(int(label))] == expected["name"]


def test_yolov5n_coco_tiny_map(assets, yolo_reference):
    """The reference protocol: letterbox 640 (minimal padding), NMS 0.001 / 0.6 / 300, pycocotools."""
    root = assets / "coco_tiny"
    dataset = CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json")
    model = yolov5n(conf_threshold=0.001, iou_threshold=0.6, max_det=300)
    evaluator = CocoEvaluator(root / "annotations" / "instances_val2017.json")
    for item in dataset:
        evaluator.update([item["target"]["image_id"]], model.detect([item["image"]]))
    result = evaluator.compute()
    assert result["images"] == 80
    assert result["map"] == pytest.approx(yolo_reference["coco_tiny_val2017_map"]["mAP_50_95"], abs=0.005)
    assert result["ap50"] == pytest.approx(yolo_reference["coco_tiny_val2017_map"]["AP50"], abs=0.005)
