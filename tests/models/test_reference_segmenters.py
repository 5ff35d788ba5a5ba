"""ESPNetv2, DiCENet and CGNet reproduce the upstream reference outputs on the reference inputs.

Each JSON in ``reference/`` was made with the upstream code: logits at given pixels, the SHA-256
and class counts of the argmax map and, for the Cityscapes models, of the prediction mapped to
CamVid ids through the declared label map (the upstream CamVid protocol).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zmask.data import read_image
from zmask.data.camvid import CAMVID_IGNORE_INDEX, CITYSCAPES_TO_CAMVID
from zmask.errors import InputError
from zmask.models.cgnet import cgnet
from zmask.models.dicenet import dicenet
from zmask.models.espnetv2 import espnetv2

CASES = {
    "espnetv2": ("espnetv2_s2_cityscapes", espnetv2),
    "dicenet": ("dicenet_s1.75_cityscapes", dicenet),
    "cgnet": ("cgnet_m3n21_camvid", cgnet),
}


def _sha256(array: torch.Tensor | np.ndarray) -> str:
    data = array.numpy() if isinstance(array, torch.Tensor) else array
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, assets):
    key, build = CASES[request.param]
    reference = json.loads((assets / "reference" / f"{key}_reference.json").read_text())[key]
    return key, build(), reference


def _input(assets, key: str, index: int, sample: dict) -> torch.Tensor:
    # The Cityscapes models' exact inputs are stored resized PNGs; CGNet reads the CamVid PNG itself.
    path = assets / "reference" / f"{key}_input_{index}.png" if "input_png" in sample else assets / sample["image"]
    image = read_image(path)
    if "input_png_sha256" in sample:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sample["input_png_sha256"]
    return image


@pytest.mark.assets
def test_reference_outputs(assets, case):
    key, model, reference = case
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    assert len(reference["samples"]) == 2
    for index, sample in enumerate(reference["samples"]):
        with torch.no_grad():
            logits = model(_input(assets, key, index, sample)[None])[0]
        assert list(logits.shape) == sample["output_shape"]
        for pixel, expected in sample["logits_at"].items():
            row, col = (int(v) for v in pixel.split(","))
            torch.testing.assert_close(logits[:, row, col], torch.tensor(expected), rtol=0, atol=1e-4)
        prediction = logits.argmax(0).to(torch.uint8)
        assert torch.bincount(prediction.flatten().long(), minlength=logits.shape[0]).tolist() == sample["argmax_class_counts"]
        assert _sha256(prediction) == sample["argmax_sha256"]
        if "camvid_map" in sample:
            # Upstream: PIL NEAREST resize of the trainId map to 480x360, then the trainId -> CamVid map.
            resized = np.asarray(Image.fromarray(prediction.numpy()).resize((480, 360), Image.NEAREST))
            mapped = np.asarray(CITYSCAPES_TO_CAMVID, dtype=np.uint8)[resized]
            assert list(mapped.shape) == sample["camvid_map"]["shape"]
            assert np.bincount(mapped.ravel(), minlength=12).tolist() == sample["camvid_map"]["class_counts"]
            assert _sha256(mapped) == sample["camvid_map"]["sha256"]


@pytest.mark.assets
def test_label_map_matches_reference(assets):
    for key in ("espnetv2_s2_cityscapes", "dicenet_s1.75_cityscapes"):
        reference = json.loads((assets / "reference" / f"{key}_reference.json").read_text())[key]
        assert list(CITYSCAPES_TO_CAMVID) == reference["cityscapes_trainid_to_camvid11"]
        assert CITYSCAPES_TO_CAMVID[reference["classes"].index("background")] == CAMVID_IGNORE_INDEX


@pytest.mark.parametrize("build", [espnetv2, dicenet])
def test_edgenets_refuse_sides_not_multiple_of_16(build):
    model = build(pretrained=False)
    with pytest.raises(InputError, match="multiples of 16"):
        model(torch.rand(1, 3, 360, 480))
    with pytest.raises(InputError, match="B x 3 x H x W"):
        model(torch.rand(3, 64, 64))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 80)).shape == (1, 20, 64, 80)


def test_cgnet_any_size_and_bad_shape():
    model = cgnet(pretrained=False)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 37, 53)).shape == (2, 11, 37, 53)
    with pytest.raises(InputError, match="B x 3 x H x W"):
        model(torch.rand(1, 1, 32, 32))


@pytest.mark.assets
@pytest.mark.parametrize("name, key", [("espnetv2_camvid", "espnetv2_s2_cityscapes"), ("dicenet_camvid", "dicenet_s1.75_cityscapes"),
                                       ("cgnet_camvid", "cgnet_m3n21_camvid")])
def test_preset_pipeline_predicts_camvid_classes_as_upstream(assets, name, key):
    """The preset's own path (prepare_image, model, task.predict through the label map) on the raw
    CamVid images gives upstream's CamVid prediction: exactly for CGNet (native size); for the
    Cityscapes models (torch instead of PIL resizing to 512x1024) the same class histogram to 1 %."""
    from zmask.models import get_preset

    preset = get_preset(name)
    model = preset.build(True)
    task = preset.task_for(model)
    reference = json.loads((assets / "reference" / f"{key}_reference.json").read_text())[key]
    for sample in reference["samples"]:
        image, _ = preset.prepare_image(read_image(assets / sample["image"]))
        with torch.no_grad():
            prediction = task.predict(model(image[None]))[0].to(torch.uint8)
        assert tuple(prediction.shape) == tuple(preset.input_size)
        if "camvid_map" not in sample:
            assert _sha256(prediction) == sample["argmax_sha256"]
            continue
        native = np.asarray(Image.fromarray(prediction.numpy()).resize((480, 360), Image.NEAREST))
        counts = np.bincount(native.ravel(), minlength=12)
        expected = np.asarray(sample["camvid_map"]["class_counts"])
        assert np.abs(counts - expected).sum() / 2 / expected.sum() < 0.01
