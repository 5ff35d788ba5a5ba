"""`zmask table`: the paper's Table 1 across models from the committed reports (cost columns left
out here: timing belongs to benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _table(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    reports = [f"espnet_camvid={ROOT / 'docs/results/espnet_camvid'}", f"yolov5n_coco={ROOT / 'docs/results/yolov5n_coco'}"]
    return subprocess.run([sys.executable, "-m", "zmask.cli", "table", "--report", *reports, "--out", str(out), "--no-bench",
                           "--no-progress", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_table_rows_come_from_the_reports(assets, tmp_path):
    out = tmp_path / "models.md"
    completed = _table(tmp_path, out)
    assert completed.returncode == 0, completed.stderr
    text = out.read_text()
    first_table = text.split("Cost per frame")[0]
    rows = {line.split("|")[1].strip(): line for line in first_table.splitlines() if line.startswith(("| espnet", "| yolo"))}
    report = json.loads((ROOT / "docs/results/yolov5n_coco/results.json").read_text())["results"]
    clean = report["masking"]["no patch"]["none"]["map"]
    recovery = report["recovery"]["L"]["zmask"]["recovery"]
    assert f"{clean:.3f}" in rows["yolov5n_coco"] and f"{recovery:.3f}" in rows["yolov5n_coco"]
    from zmask.core.profile import load_profile

    grid = load_profile(ROOT / "src/zmask/profiles/espnet_camvid.safetensors").config.heatmap_size
    assert "net.model.1" in text and f"{grid[0]}x{grid[1]}" in text  # the layers and grid of each report's profile
    again = _table(tmp_path, out)  # a table of zmask's own is replaced only with --overwrite
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _table(tmp_path, out, "--overwrite").returncode == 0


@pytest.mark.parametrize("existing", ["notes.md", "table.txt"])
def test_table_never_replaces_a_user_file(tmp_path, existing):
    out = tmp_path / existing
    out.write_text("my notes\n")
    completed = _table(tmp_path, out, "--overwrite")
    assert completed.returncode == 2 and out.read_text() == "my notes\n"
