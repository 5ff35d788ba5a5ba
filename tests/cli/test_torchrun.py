"""`zmask evaluate` under torch's own launcher (2 CPU processes, gloo) writes the results of one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def _evaluate(launcher: list[str], out: Path, profile: Path, noise_patch: Path) -> dict:
    command = [*launcher, "evaluate", "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out),
               "--patch", f"L={noise_patch}", "--defenses", "zmask", "none", "hn", "--limit", "5", "--train-images", "4",
               "--batch-size", "1", "--bootstrap", "40", "--threads", "1", "--no-progress"]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=out.parent, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    report["results"].pop("seconds")
    return report


def _assert_same(single, distributed, where="results"):
    if isinstance(single, dict):
        assert set(single) == set(distributed), where
        for key in single:
            _assert_same(single[key], distributed[key], f"{where}.{key}")
    elif isinstance(single, list):
        assert len(single) == len(distributed), where
        for index, (a, b) in enumerate(zip(single, distributed)):
            _assert_same(a, b, f"{where}[{index}]")
    elif isinstance(single, float) and isinstance(distributed, float):
        assert (math.isnan(single) and math.isnan(distributed)) or distributed == pytest.approx(single, rel=1e-6, abs=1e-9), where
    else:
        assert single == distributed, where


def test_evaluate_under_torchrun_matches_one_process(workspace, profile, noise_patch):
    single = _evaluate([sys.executable, "-m", "zmask.cli"], workspace / "single", profile, noise_patch)
    distributed = _evaluate([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zmask.cli"],
                            workspace / "torchrun", profile, noise_patch)
    assert (single["meta"]["world_size"], distributed["meta"]["world_size"]) == (1, 2)  # two ranks, each with its shard
    _assert_same(single["results"], distributed["results"])
    assert single["results"]["bootstrap"]["images"] == 5 and single["results"]["masking"]["L"]["zmask"]["miou_ci"] is not None
