"""Shared fixtures. Tests that need the assets folder fail (never skip) under CI when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def _assets_folder() -> Path | None:
    configured = os.environ.get("ZMASK_ASSETS")
    # Absolute (links kept, as zmask.assets reads it), so that child processes started in other
    # folders see the same folder as this one.
    candidates = [Path(os.path.abspath(os.path.expanduser(configured)))] if configured else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "assets")
    for folder in candidates:
        if (folder / "README.md").is_file():
            return folder
    return None


ASSETS = _assets_folder()
if ASSETS is not None:
    os.environ["ZMASK_ASSETS"] = str(ASSETS)  # resolved once; subprocesses inherit the absolute path


@pytest.fixture(scope="session")
def assets() -> Path:
    folder = ASSETS
    if folder is None:
        message = "assets folder not found: set ZMASK_ASSETS to the shared assets folder"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ["ZMASK_ASSETS"] = str(folder)  # the library looks assets up there
    return folder
