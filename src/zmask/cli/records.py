"""Run records: what an output folder of the command line says about how it was made (``run.json``).

``run.json`` is written atomically (a reader, or a later run, never sees half of it) when a command
starts, with ``status: running``, and rewritten as the command goes (after every item, at most once
a second while a video runs) and when it ends (``complete``, ``failed`` or ``interrupted``). So
after any end, a ``kill -9`` included, it says which inputs were processed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..fileio import atomic_write_text
from .checks import RUN_RECORD


def _base_record(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..assets import ASSETS, locate

    used = {name: asset.sha256 for name, asset in ASSETS.items() if asset.sha256 and locate(name) is not None}
    return {
        "command": args.command, "options": {k: v for k, v in vars(args).items() if k != "func"}, "zmask_version": __version__,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seed": args.seed, "asset_sha256": used,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class RunRecord:
    """The ``run.json`` of one command's output folder, rewritten atomically on every :meth:`update`."""

    def __init__(self, folder: Path, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.fields: dict[str, Any] = {**_base_record(args), **(extra or {})}
        self._last_write = 0.0

    def update(self, every: float = 0.0, **fields: Any) -> None:
        """Merge ``fields`` and rewrite the file; with ``every`` > 0, write only if the last write is
        at least that many seconds old (the fields are kept for the next write)."""
        self.fields.update(fields)
        now = time.monotonic()
        if every > 0 and now - self._last_write < every:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fields["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(self.folder / RUN_RECORD, json.dumps(self.fields, indent=2, default=str), fsync=False)
        self._last_write = now


def write_run_record(folder: Path, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
    """Record the full configuration, package version, seed and asset hashes in an output folder."""
    RunRecord(folder, args, extra).update()
