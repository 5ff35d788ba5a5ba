"""Your own model from the command line: ``--model tests.cli.user_factory:factory`` fitted, attacked,
defended, evaluated and listed end to end at tiny size on a SegNet-layout folder made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zmask.cli import main
from zmask.core.profile import load_profile

FACTORY = "tests.cli.user_factory:factory"
MODEL = ["--model", FACTORY, "--task", "segmentation", "--input-size", "96", "128", "--num-classes", "4"]
LAYERS = ["--shallow", "stem.0", "stem.1", "--deep", "stem.1", "block.1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 random 60x80 images with 4-class labels (top rows unlabelled, 255), listed SegNet-style:
    16 in train.txt, 4 in val.txt (a size other than the model's, so the resize is exercised)."""
    root = tmp_path_factory.mktemp("user_data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    generator = np.random.default_rng(0)
    lines = []
    for index in range(20):
        image = (generator.random((60, 80, 3)) * 255).astype(np.uint8)
        label = generator.integers(0, 4, (60, 80)).astype(np.uint8)
        label[:5] = 255
        Image.fromarray(image).save(root / "images" / f"{index:02d}.png")
        Image.fromarray(label, "L").save(root / "labels" / f"{index:02d}.png")
        lines.append(f"images/{index:02d}.png labels/{index:02d}.png")
    (root / "train.txt").write_text("\n".join(lines[:16]) + "\n")
    (root / "val.txt").write_text("\n".join(lines[16:]) + "\n")
    return root


@pytest.fixture(scope="module")
def fitted(folder, tmp_path_factory):
    """A noise patch and a profile fitted on the user's model through the command line."""
    work = tmp_path_factory.mktemp("user_fit")
    patch, profile = work / "noise.png", work / "user.safetensors"
    assert main(["attack", *MODEL, "--noise", "--size", "L", "--out", str(patch)]) == 0
    code = main(["fit", *MODEL, *LAYERS, "--data", str(folder), "--patches", str(patch), "--out", str(profile),
                 "--statistics-images", "4", "--fusion-images", "4", "--calibration-images", "8", "--epochs", "2", "--no-progress"])
    assert code == 0
    return patch, profile


def test_fit_records_the_user_model_and_its_layers(fitted):
    recorded = load_profile(fitted[1])
    assert recorded.model_class == "TinySegmenter"
    assert recorded.config.shallow_layers == ("stem.0", "stem.1") and recorded.config.deep_layers == ("stem.1", "block.1")
    assert tuple(recorded.state.input_size) == (96, 128)  # the folder's 60x80 images were resized to --input-size
    assert recorded.layers == {"stem.0": 8, "stem.1": 8, "block.1": 16}
    assert recorded.state.threshold is not None


def test_defend_with_the_fitted_profile(capsys, folder, fitted, tmp_path):
    out = tmp_path / "defended"
    images = [str(folder / "images" / f"{index:02d}.png") for index in range(3)]  # any images will do
    # layers and input size come from the profile; the task and class count from the command line
    code, stdout, _ = run(capsys, "defend", *images, "--model", FACTORY, "--task", "segmentation", "--num-classes", "4",
                          "--profile", str(fitted[1]), "--out", str(out), "--json")
    assert code == 0
    records = [json.loads(line) for line in stdout.splitlines()]
    assert len(records) == 3 and all(r["preprocessing"] == "resized to 96x128" for r in records)
    assert {r["threshold"] for r in records} == {load_profile(fitted[1]).state.threshold}
    assert Image.open(out / "masked" / "00.png").size == (128, 96)
    assert json.loads((out / "run.json").read_text())["profile_sha256"]


def test_attack_and_evaluate_on_the_data_folder(capsys, folder, fitted, tmp_path):
    patch = tmp_path / "crafted.png"
    code, _, _ = run(capsys, "attack", *MODEL, "--steps", "2", "--batch-size", "2", "--limit", "2", "--size", "L",
                     "--data", str(folder), "--out", str(patch), "--no-progress")
    assert code == 0 and json.loads(patch.with_suffix(".json").read_text())["model"] == FACTORY
    out = tmp_path / "report"
    code, stdout, _ = run(capsys, "evaluate", *MODEL, "--profile", str(fitted[1]), "--data", str(folder), "--split", "val",
                          "--limit", "2", "--train-images", "4", "--patch", f"L={patch}", "--defenses", "zmask", "none",
                          "--out", str(out), "--no-progress", "--json")
    assert code == 0
    masking = json.loads(stdout)["results"]["masking"]
    miou = masking["no patch"]["none"]["miou"]
    assert 0.0 <= miou <= 1.0 and (out / "summary.md").is_file()


def test_models_lists_the_layers_of_a_factory(capsys):
    code, stdout, _ = run(capsys, "models", "--layers", FACTORY, "--json")
    assert code == 0 and json.loads(stdout) == ["stem", "stem.0", "stem.1", "block", "block.0", "block.1", "head"]
    code, stdout, _ = run(capsys, "models", "--layers", f"{Path(__file__).parent / 'user_factory.py'}:factory")  # a file works too
    assert code == 0 and "block.1" in stdout.split()


@pytest.mark.parametrize("argv, message", [
    (["fit", *MODEL, "--patches", "p.png", "--out", "x.safetensors"], "give --shallow and --deep"),
    (["fit", "--model", FACTORY, "--task", "segmentation", *LAYERS, "--patches", "p.png", "--out", "x.safetensors"], "give --input-size"),
    (["fit", "--model", FACTORY, "--task", "segmentation", "--input-size", "96", "128", *LAYERS, "--patches", "p.png", "--out", "x.safetensors"],
     "needs the number of classes"),
    (["models", "--layers", "no_such_package.models:factory"], "no module named 'no_such_package'"),
    (["models", "--layers", "tests.cli.user_factory:factroy"], "did you mean 'factory'"),
    (["models", "--layers", "tests.cli.user_factory:not_callable"], "not a callable"),
    (["models", "--layers", "tests.cli.user_factory:not_a_module"], "not a torch.nn.Module"),
    (["defend", ".", *MODEL, "--out", "o"], "has no shipped profile"),
    (["defend", ".", "--model", "espnet_camvid", "--task", "segmentation", "--out", "o"], "--task describe your own model"),
])
def test_user_model_errors_are_one_line(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output paths land here; the factory module is already importable
    (tmp_path / "p.png").write_bytes(b"")  # input paths are checked first; these errors come next
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_unknown_layer_points_to_models_layers(capsys, folder, fitted, tmp_path):
    code, _, err = run(capsys, "fit", *MODEL, "--shallow", "stem.9", "--deep", "block.1", "--data", str(folder), "--patches", str(fitted[0]),
                       "--out", str(tmp_path / "x.safetensors"), "--statistics-images", "4", "--fusion-images", "4", "--calibration-images", "8")
    assert code == 2 and "no layer 'stem.9'" in err and "zmask models --layers" in err


def test_factory_receives_num_classes():
    from zmask.models import build_from_factory

    with torch.no_grad():
        output = build_from_factory(FACTORY, num_classes=6)(torch.rand(1, 3, 32, 48))
    assert output.shape == (1, 6, 32, 48)
