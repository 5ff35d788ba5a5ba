"""The type checker over ``src/zmask`` (configuration in ``pyproject.toml``, ``[tool.mypy]``): the
Protocols of ``zmask.contracts`` are checked against everything that implements or calls them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes_on_the_package():
    completed = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--config-file", str(ROOT / "pyproject.toml")],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
