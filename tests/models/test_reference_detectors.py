"""NanoDet-m and FastestDet reproduce the upstream reference outputs (raw heads, hooked layers,
decoded detections), their upstream preprocessing bit for bit, and the mapping of boxes back to
the original image through the presets' datasets and tasks. The coco_tiny mAP of each preset is
measured by a command (see the module docstrings), not here: these tests use the two reference
images only."""

from __future__ import annotations

import json

import pytest
import torch

from zmask import ActivationCapture
from zmask.assets import asset_path
from zmask.data import read_image
from zmask.errors import AssetError, InputError
from zmask.models import PRESETS, fastestdet, nanodet_m, nanodet_warp, scale_boxes, stretch_resize
from zmask.models.fastestdet import Stretch, StretchedDetectionTask
from zmask.models.yolov5 import COCO80_TO_91, Letterbox

pytestmark = pytest.mark.assets

ATOL = 1e-4  # the references hold 6 decimals


@pytest.fixture(scope="module")
def nanodet_reference(assets):
    return json.loads(asset_path("nanodet_m_reference").read_text())["nanodet_m_coco"]


@pytest.fixture(scope="module")
def fastestdet_reference(assets):
    return json.loads(asset_path("fastestdet_reference").read_text())["fastestdet_coco"]


@pytest.fixture(scope="module")
def nanodet_model(assets):
    return nanodet_m(score_threshold=0.05, iou_threshold=0.6, max_det=100)


@pytest.fixture(scope="module")
def fastestdet_model(assets):
    return fastestdet(score_threshold=0.001, iou_threshold=0.45)


def _check_stats(tensor: torch.Tensor, stats: dict, atol: float = ATOL) -> None:
    values = tensor.double()
    observed = {"mean": values.mean(), "std": values.std(unbiased=False), "min": values.min(), "max": values.max()}
    for key, value in observed.items():
        assert float(value) == pytest.approx(stats[key], abs=atol), key


def test_nanodet_reference_outputs(nanodet_model, nanodet_reference):
    model = nanodet_model
    assert sum(p.numel() for p in model.parameters()) == 959_348
    for index, sample in enumerate(nanodet_reference["samples"]):
        image = read_image(asset_path(f"nanodet_m_input_{index}"))[None]
        with torch.no_grad():
            cls_scores, bbox_preds = model.raw(image)
            detections = model(image)[0]
        assert [list(t.shape[1:]) for t in cls_scores] == sample["output_shapes"]["cls_scores"]
        assert [list(t.shape[1:]) for t in bbox_preds] == sample["output_shapes"]["bbox_preds"]
        for key, expected in sample["raw_at"].items():
            level, row, col = (int(v) for v in key.removeprefix("level").split(","))
            torch.testing.assert_close(cls_scores[level][0, :, row, col], torch.tensor(expected["cls_logits"]), rtol=0, atol=ATOL)
            torch.testing.assert_close(bbox_preds[level][0, :, row, col], torch.tensor(expected["bbox_dist_logits"]), rtol=0, atol=ATOL)
        for level in range(3):
            _check_stats(cls_scores[level], sample["output_stats"][f"cls_scores[{level}]"])
            _check_stats(bbox_preds[level], sample["output_stats"][f"bbox_preds[{level}]"])
        expected = sample["detections_score0.05_nms0.6_max100"]
        assert len(detections["boxes"]) == expected["count"]
        (h0, w0), matrix = sample["original_hw"], sample["warp_matrix"]
        original = scale_boxes(detections["boxes"], Letterbox(matrix[0][0], matrix[0][2], matrix[1][2], (h0, w0)))
        for rank, row in enumerate(expected["top10"]):
            torch.testing.assert_close(detections["boxes"][rank], torch.tensor(row["xyxy_input"]), rtol=0, atol=1e-3)
            torch.testing.assert_close(original[rank], torch.tensor(row["xyxy_original"]), rtol=0, atol=2e-3)
            assert float(detections["scores"][rank]) == pytest.approx(row["score"], abs=1e-5)
            assert int(detections["labels"][rank]) == row["coco_category_id"] == COCO80_TO_91[row["class"]]
            assert model.names[row["class"]] == row["name"]
        assert torch.all(detections["scores"][:-1] >= detections["scores"][1:])


def test_nanodet_hooked_layers_match_reference(nanodet_model, nanodet_reference):
    """Hooks read the same values as upstream (the PAN adds out of place; upstream hooks cloned)."""
    sample = nanodet_reference["samples"][0]
    layers = {f"net.{name}": stats for name, stats in sample["intermediate"].items()}
    image = read_image(asset_path("nanodet_m_input_0"))[None]
    with torch.no_grad(), ActivationCapture(nanodet_model, list(layers), clone=False) as capture:
        nanodet_model.raw(image)
    assert not capture.modified()
    for name, stats in layers.items():
        assert list(capture.activations[name].shape[1:]) == stats["shape"], name
        _check_stats(capture.activations[name], stats)


def test_nanodet_warp_is_upstream_preprocessing(assets, nanodet_reference):
    for index, sample in enumerate(nanodet_reference["samples"]):
        warped, geometry = nanodet_warp(read_image(assets / sample["source_image"]), (320, 320))
        assert torch.equal(warped, read_image(asset_path(f"nanodet_m_input_{index}")))
        (h0, w0), matrix = sample["original_hw"], sample["warp_matrix"]
        assert geometry.original_size == (h0, w0)
        assert (geometry.gain, geometry.pad_w, geometry.pad_h) == pytest.approx((matrix[0][0], matrix[0][2], matrix[1][2]))
    # A portrait image: the long side (height) becomes 320, centred horizontally, black border.
    image = 0.2 + 0.8 * torch.rand(3, 200, 100, generator=torch.Generator().manual_seed(0))
    warped, geometry = nanodet_warp(image, (320, 320))
    assert warped.shape == (3, 320, 320) and geometry.gain == 1.6 and geometry.pad_w == 80 and geometry.pad_h == 0
    assert warped[:, :, :79].abs().max() == 0 and warped[:, :, 240:].abs().max() == 0  # outside the taps' reach
    assert warped[:, :, 80:240].min() > 0  # every interior sample mixes bright pixels
    with pytest.raises(InputError, match="3 x H x W"):
        nanodet_warp(torch.rand(1, 3, 10, 10))


def test_fastestdet_reference_outputs(fastestdet_model, fastestdet_reference):
    model = fastestdet_model
    assert sum(p.numel() for p in model.parameters()) == 244_490
    for index, sample in enumerate(fastestdet_reference["samples"]):
        image = read_image(asset_path(f"fastestdet_input_{index}"))[None]
        layers = ["net.detect_head.obj_layers", "net.detect_head.cls_layers"]
        with torch.no_grad(), ActivationCapture(model, layers) as capture:
            output = model.raw(image)
        with torch.no_grad():
            detections = model(image)[0]
        assert list(output.shape[1:]) == sample["output_shape"]
        for key, expected in sample["output_at"].items():
            row, col = (int(v) for v in key.split(","))
            torch.testing.assert_close(output[0, :, row, col], torch.tensor(expected), rtol=0, atol=ATOL)
        for key, expected in sample["pre_activation_at"].items():
            row, col = (int(v) for v in key.split(","))
            obj = capture.activations["net.detect_head.obj_layers"][0, 0, row, col]
            assert float(obj) == pytest.approx(expected["obj_logit"], abs=ATOL)
            cls = capture.activations["net.detect_head.cls_layers"][0, :, row, col]
            values, classes = cls.topk(3)
            assert [[int(c), pytest.approx(float(v), abs=ATOL)] for c, v in zip(classes, values)] == expected["cls_logit_top3"]
        _check_stats(output, sample["output_stats"]["all"])
        _check_stats(output[:, 0], sample["output_stats"]["obj_sigmoid"])
        _check_stats(output[:, 5:], sample["output_stats"]["cls_softmax"])
        h0, w0 = sample["original_hw"]
        stretch = Stretch(352 / w0, 352 / h0, (h0, w0))
        expected = sample["detections_eval_conf0.001_nms0.45"]
        assert len(detections["boxes"]) == expected["count"]
        original = stretch.to_original(detections["boxes"])
        for rank, row in enumerate(expected["top10"]):
            torch.testing.assert_close(detections["boxes"][rank] / 352, torch.tensor(row["xyxy_normalized"]), rtol=0, atol=1e-5)
            torch.testing.assert_close(original[rank], torch.tensor(row["xyxy_original"]), rtol=0, atol=2e-3)
            assert float(detections["scores"][rank]) == pytest.approx(row["score"], abs=1e-5)
            assert int(detections["labels"][rank]) == row["coco_category_id"] == COCO80_TO_91[row["class"]]
            assert model.names[row["class"]] == row["name"]
        demo = sample["detections_demo_conf0.65_nms0.45"]
        model.score_threshold = 0.65
        try:
            with torch.no_grad():
                shown = model(image)[0]
        finally:
            model.score_threshold = 0.001
        assert len(shown["boxes"]) == demo["count"]
        for box, score, label, row in zip(shown["boxes"], shown["scores"], shown["labels"], demo["all"]):
            torch.testing.assert_close(box / 352, torch.tensor(row["xyxy_normalized"]), rtol=0, atol=1e-5)
            assert float(score) == pytest.approx(row["score"], abs=1e-5) and int(label) == row["coco_category_id"]


def test_fastestdet_hooked_layers_match_reference(fastestdet_model, fastestdet_reference):
    sample = fastestdet_reference["samples"][0]
    layers = {f"net.{name}": stats for name, stats in sample["intermediate"].items()}
    image = read_image(asset_path("fastestdet_input_0"))[None]
    with torch.no_grad(), ActivationCapture(fastestdet_model, list(layers), clone=False) as capture:
        fastestdet_model.raw(image)
    assert not capture.modified()
    for name, stats in layers.items():
        assert list(capture.activations[name].shape[1:]) == stats["shape"], name
        _check_stats(capture.activations[name], stats)


def test_stretch_resize_is_upstream_preprocessing(assets, fastestdet_reference):
    for index, sample in enumerate(fastestdet_reference["samples"]):
        resized, geometry = stretch_resize(read_image(assets / sample["source_image"]), (352, 352))
        assert torch.equal(resized, read_image(asset_path(f"fastestdet_input_{index}")))
        h0, w0 = sample["original_hw"]
        box = torch.tensor([[10.0, 20.0, w0 - 5.0, h0 - 7.0]])
        torch.testing.assert_close(geometry.to_original(geometry.to_input(box)), box)
    with pytest.raises(InputError, match="3 x H x W"):
        stretch_resize(torch.rand(4, 10, 10))


@pytest.mark.parametrize("name, sample_key, reference", [
    ("nanodet_m_coco", "detections_score0.05_nms0.6_max100", "nanodet_m_reference"),
    ("fastestdet_coco", "detections_eval_conf0.001_nms0.45", "fastestdet_reference"),
])
def test_preset_data_and_metric_map_to_original_pixels(assets, name, sample_key, reference):
    """The preset's dataset gives the upstream model input of the reference image, and its task
    scores the detections in original pixels (the reference's ``xyxy_original``)."""
    sample = json.loads(asset_path(reference).read_text())[name]["samples"][0]
    preset = PRESETS[name]
    dataset = preset.dataset("val")
    index = dataset.dataset.image_ids.index(sample["image_id"])
    item = dict(dataset[index], index=index)
    stem = "nanodet_m" if name.startswith("nanodet") else "fastestdet"
    assert torch.equal(item["image"], read_image(asset_path(f"{stem}_input_0")))
    model = preset.build(True)
    task = preset.task_for(model, "val")
    if name == "fastestdet_coco":
        assert isinstance(task, StretchedDetectionTask)
    batch = task.collate([item])
    accumulator = task.metric()
    with torch.no_grad():
        task.update_metric(accumulator, task.forward(batch["image"]), batch, torch.zeros(1, 1, *preset.input_size))
    records = accumulator.records
    assert len(records) == sample[sample_key]["count"]
    for record, row in zip(records, sample[sample_key]["top10"]):
        x1, y1, x2, y2 = row["xyxy_original"]
        assert record["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=2e-3)
        assert record["category_id"] == row["coco_category_id"] and record["image_id"] == sample["image_id"]
    # Ground-truth boxes are mapped into the input frame consistently with the way predictions are mapped back.
    raw = dataset.dataset[index]["target"]["boxes"]
    mapped = item["target"]["boxes"]
    back = item["letterbox"].to_original(mapped) if isinstance(item["letterbox"], Stretch) else scale_boxes(mapped, item["letterbox"])
    torch.testing.assert_close(back, raw, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name, stem", [("nanodet_m_coco", "nanodet_m"), ("fastestdet_coco", "fastestdet")])
def test_presets_layers_fire_and_objectives_are_differentiable(assets, name, stem):
    preset = PRESETS[name]
    model = preset.build(True)
    assert tuple(preset.input_size) == {"nanodet_m_coco": (320, 320), "fastestdet_coco": (352, 352)}[name]
    images = read_image(asset_path(f"{stem}_input_0"))[None].requires_grad_(True)
    with ActivationCapture(model, preset.config().layers) as capture:
        output = model(images)
    assert not capture.missing()
    assert set(output[0]) == {"boxes", "labels", "scores"} and output[0]["labels"].dtype == torch.int64
    # The person the model finds most confidently, as ground truth.
    targets = [{"boxes": output[0]["boxes"][:1].detach(), "labels": torch.tensor([1])}]
    assert int(output[0]["labels"][0]) == 1
    for kind in model.objectives:
        value = model.objective(images, targets, kind)
        (grad,) = torch.autograd.grad(value, images)
        assert torch.isfinite(value) and grad.abs().sum() > 0, kind
    assert float(model.objective(images, targets, "untargeted").detach()) < 0  # the true class wins before any attack
    empty = model.objective(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]).detach()
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match="not COCO category ids"):
        model.objective(images, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([12])}])
    with pytest.raises(InputError, match="multiples of 32"):
        model(torch.rand(1, 3, 300, 300))
    with pytest.raises(InputError, match="B x 3 x H x W"):
        model(torch.rand(3, *preset.input_size))


def test_builders_refuse_other_weights(assets):
    with pytest.raises(AssetError, match="does not hold NanoDet-m weights"):
        nanodet_m(weights_path=asset_path("fastestdet_coco"))
    with pytest.raises(AssetError, match="does not hold FastestDet weights"):
        fastestdet(weights_path=asset_path("nanodet_m_coco"))


def test_detect_maps_any_image_back(nanodet_model, fastestdet_model, assets, nanodet_reference, fastestdet_reference):
    """``detect`` on the original image = the reference detections in original pixels."""
    for model, reference, key in ((nanodet_model, nanodet_reference, "detections_score0.05_nms0.6_max100"),
                                  (fastestdet_model, fastestdet_reference, "detections_eval_conf0.001_nms0.45")):
        sample = reference["samples"][1]
        result = model.detect([read_image(assets / sample["source_image"])])[0]
        assert len(result["boxes"]) == sample[key]["count"]
        expected = torch.tensor([row["xyxy_original"] for row in sample[key]["top10"]])
        torch.testing.assert_close(result["boxes"][:10], expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("name, stem", [("nanodet_m_coco", "nanodet_m"), ("fastestdet_coco", "fastestdet")])
def test_shipped_profile_flags_the_committed_L_patch(assets, name, stem):
    """The preset's shipped profile (fitted on train) passes a val image and flags it with the
    committed L patch, and its mask covers the patch."""
    from zmask import ZMask
    from zmask.attacks import load_patch
    from zmask.evaluation import place_patches
    from zmask.models import profiles as profiles_module

    defense = ZMask.from_preset(name)
    image = read_image(asset_path(f"{stem}_input_1"))[None]
    patch = load_patch(profiles_module.PROFILE_FOLDER.parent / "patches" / f"{name}_L.png")[0]
    attacked, masks = place_patches(image, patch, [0], 0)
    with torch.no_grad():
        result = defense.detect(torch.cat([image, attacked]))
    assert result.flagged.tolist() == [False, True]
    predicted, true = result.patch_mask[1].bool(), masks[0].bool()
    assert (predicted & true).sum() / (predicted | true).sum() > 0.5  # patch-mask IoU
