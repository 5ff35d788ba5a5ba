"""Run records: what an output folder of the command line says about how it was made (``run.json``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__


def write_run_record(folder: Path, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
    """Record the full configuration, package version, seed and asset hashes in an output folder."""
    from ..assets import ASSETS, locate

    folder.mkdir(parents=True, exist_ok=True)
    used = {name: asset.sha256 for name, asset in ASSETS.items() if asset.sha256 and locate(name) is not None}
    record = {
        "command": args.command, "options": {k: v for k, v in vars(args).items() if k != "func"}, "zmask_version": __version__,
        "torch": torch.__version__, "seed": args.seed, "asset_sha256": used, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}),
    }
    (folder / "run.json").write_text(json.dumps(record, indent=2, default=str))
