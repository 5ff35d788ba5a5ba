"""Fixtures shared by the command-line tests: a small ESPNet-CamVid profile fitted once per session."""

from __future__ import annotations

import pytest

from zmask.cli import main


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, assets):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def noise_patch(workspace):
    path = workspace / "noise.png"
    assert main(["attack", "--model", "espnet_camvid", "--noise", "--out", str(path), "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="session")
def profile(workspace, noise_patch):
    path = workspace / "espnet.safetensors"
    code = main(["fit", "--model", "espnet_camvid", "--patches", str(noise_patch), "--out", str(path), "--statistics-images", "4",
                 "--fusion-images", "4", "--calibration-images", "6", "--epochs", "2", "--no-progress"])
    assert code == 0 and path.is_file()
    return path
