"""Assets and datasets: missing or corrupted files give errors naming the file; metrics are exact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from zmask import AssetError, ZMaskError
from zmask.assets import asset_path, status
from zmask.data import CamVid, CocoDetection, ImageFolder, read_image
from zmask.models import espnet
from zmask.tasks import CocoEvaluator
from zmask.tasks.segmentation import ConfusionMatrix


@pytest.fixture
def empty_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMASK_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("ZMASK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "assets").mkdir()
    return tmp_path / "assets"


def test_missing_asset_names_file_source_and_fix(empty_assets):
    with pytest.raises(AssetError) as error:
        espnet("camvid")
    message = str(error.value)
    assert "weights/espnet_p_2_q_8_camvid.pth" in message and "sacmehta/ESPNet" in message and "ZMASK_ASSETS" in message
    assert {row["name"]: row["state"] for row in status()}["espnet_camvid"] == "missing"


def test_corrupted_asset_is_never_used(empty_assets, assets):
    target = empty_assets / "weights" / "espnet_p_2_q_8_camvid.pth"
    target.parent.mkdir(parents=True)
    data = bytearray((assets / "weights" / "espnet_p_2_q_8_camvid.pth").read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(AssetError, match=r"espnet_p_2_q_8_camvid.pth has SHA-256 .* expected 7d354a25"):
        asset_path("espnet_camvid")
    assert {row["name"]: row["state"] for row in status()}["espnet_camvid"] == "corrupted"


def test_assets_verify(assets, monkeypatch):
    monkeypatch.setenv("ZMASK_ASSETS", str(assets))
    states = {row["name"]: row["state"] for row in status()}
    assert all(state == "ok" for state in states.values()), states


def _small_camvid(assets, tmp_path, count=3):
    root = tmp_path / "camvid"
    for folder in ("val", "valannot"):
        (root / folder).mkdir(parents=True)
    lines = (assets / "camvid" / "val.txt").read_text().splitlines()[:count]
    for line in lines:
        for part in line.split():
            shutil.copy(assets / "camvid" / part, root / part)
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root, lines


def test_camvid_dataset_and_its_errors(assets, tmp_path):
    root, lines = _small_camvid(assets, tmp_path)
    item = CamVid(root, "val")[0]
    assert item["image"].shape == (3, 360, 480) and item["label"].shape == (360, 480)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    label = root / lines[1].split()[1]
    label.unlink()
    with pytest.raises(ZMaskError, match=f"label file {label}"):
        CamVid(root, "val")
    shutil.copy(assets / "camvid" / lines[1].split()[1], label)
    image = root / lines[2].split()[0]
    image.write_bytes(b"not a png")
    with pytest.raises(ZMaskError, match=f"cannot read image {image}"):
        CamVid(root, "val")[2]
    with pytest.raises(ZMaskError, match="test.txt does not exist"):
        CamVid(root, "test")


def test_image_folder_and_coco_errors(assets, tmp_path):
    with pytest.raises(ZMaskError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZMaskError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(ZMaskError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    annotations = json.loads((assets / "coco_tiny" / "annotations" / "instances_val2017.json").read_text())
    annotations["images"] = annotations["images"][:2]
    (tmp_path / "images").mkdir()
    shutil.copy(assets / "coco_tiny" / "val2017" / annotations["images"][0]["file_name"], tmp_path / "images")
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    with pytest.raises(ZMaskError, match=annotations["images"][1]["file_name"]):
        CocoDetection(tmp_path / "images", tmp_path / "ann.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ZMaskError, match="not a COCO instances file"):
        CocoDetection(tmp_path / "images", tmp_path / "bad.json")


def test_coco_patch_category_is_split_out(assets, tmp_path):
    annotations = json.loads((assets / "coco_tiny" / "annotations" / "instances_val2017.json").read_text())
    annotations["categories"].append({"id": 1000, "name": "adversarial_patch", "supercategory": "patch"})
    first = annotations["images"][0]
    annotations["annotations"].append({"id": 10**9, "image_id": first["id"], "category_id": 1000, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0})
    (tmp_path / "apricot.json").write_text(json.dumps(annotations))
    dataset = CocoDetection(assets / "coco_tiny" / "val2017", tmp_path / "apricot.json", patch_category="adversarial_patch")
    item = dataset[dataset.image_ids.index(first["id"])]
    assert item["target"]["patch_boxes"].tolist() == [[10.0, 20.0, 40.0, 60.0]]
    assert 1000 not in item["target"]["labels"].tolist()


def test_confusion_matrix_by_hand():
    matrix = ConfusionMatrix(num_classes=2, ignore_index=9)
    label = torch.tensor([[0, 0, 1, 1, 9]])
    prediction = torch.tensor([[0, 1, 1, 5, 0]])  # 5: an output outside the evaluated classes
    matrix.update(prediction, label)
    result = matrix.compute()
    assert result["class_iou"] == pytest.approx([1 / 2, 1 / 3])
    assert result["pixel_accuracy"] == pytest.approx(2 / 4)
    masked = ConfusionMatrix(num_classes=2, ignore_index=9)
    masked.update(prediction, label, ignore_mask=torch.tensor([[False, True, False, True, False]]))
    assert masked.compute()["miou"] == pytest.approx(1.0)


def test_coco_evaluator_perfect_and_empty(assets):
    annotation_file = assets / "coco_tiny" / "annotations" / "instances_val2017.json"
    dataset = CocoDetection(assets / "coco_tiny" / "val2017", annotation_file, limit=5)
    evaluator = CocoEvaluator(annotation_file)
    for index in range(len(dataset)):
        target = dataset.records[index]
        boxes, labels = [], []
        for annotation in dataset._annotations[target["id"]]:
            x, y, w, h = annotation["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(annotation["category_id"])
        evaluator.update([target["id"]], [{"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.ones(len(boxes)), "labels": torch.tensor(labels)}])
    assert evaluator.compute()["map"] == pytest.approx(1.0, abs=1e-6)
    empty = CocoEvaluator(annotation_file)
    empty.update([dataset.records[0]["id"]], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}])
    assert empty.compute()["map"] == 0.0


def _zmask_assets(cwd, environment: dict[str, str]):
    """``zmask assets --json`` (and its human listing) run as a fresh process in ``cwd``, on this checkout's code."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    env = {k: v for k, v in os.environ.items() if k not in ("ZMASK_ASSETS", "ZMASK_CACHE")}
    env.update(environment, PYTHONPATH=os.pathsep.join([str(src), env.get("PYTHONPATH", "")]))
    both = "from zmask.cli import main; main(['assets', '--json']); main(['assets'])"  # one process, two listings
    machine, looked = subprocess.run([sys.executable, "-c", both], cwd=cwd, env=env, capture_output=True, text=True,
                                     check=True).stdout.splitlines()[:2]
    return {row["name"]: row for row in json.loads(machine)}, looked


def test_relative_zmask_assets_is_resolved_against_the_current_folder(assets, tmp_path):
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = os.path.relpath(assets, elsewhere)
    rows, looked = _zmask_assets(elsewhere, {"ZMASK_ASSETS": relative, "ZMASK_CACHE": str(tmp_path / "cache")})
    assert all(row["state"] == "ok" for row in rows.values()), rows
    # Made absolute against the current folder without resolving links (a symlinked assets folder
    # keeps its own name).
    expected = Path(os.path.abspath(elsewhere / relative))
    assert expected == Path(os.path.abspath(assets))
    assert rows["espnet_camvid"]["path"] == str(expected / "weights" / "espnet_p_2_q_8_camvid.pth")
    assert looked.startswith(f"looked in: {expected} (ZMASK_ASSETS)")


def test_unset_zmask_assets_finds_the_folder_beside_the_checkout(assets, tmp_path):
    from zmask.assets import repository_root

    root = repository_root()
    beside = root.parent / "shared" / "assets" if root is not None else None
    if beside is None or beside.resolve() != assets.resolve():
        pytest.skip("the assets folder is not beside this checkout")
    rows, looked = _zmask_assets(tmp_path, {"ZMASK_CACHE": str(tmp_path / "cache")})
    assert all(row["state"] == "ok" for row in rows.values()), rows
    assert looked.startswith(f"looked in: {beside} (beside the repository checkout), {tmp_path / 'cache'} (user cache)")


def test_an_installed_copy_does_not_guess_a_repository(tmp_path, monkeypatch):
    from zmask import assets as assets_module

    monkeypatch.setattr(assets_module, "__file__", str(tmp_path / "site-packages" / "zmask" / "assets.py"))
    monkeypatch.delenv("ZMASK_ASSETS", raising=False)
    monkeypatch.setenv("ZMASK_CACHE", str(tmp_path / "cache"))
    assert assets_module.repository_root() is None
    assert assets_module.search_locations() == [(tmp_path / "cache", "user cache")]
