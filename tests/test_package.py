"""Package-level contracts: a light ``import zmask``, no behaviour chosen by comparing names, no
import cycles, the version defined once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def test_import_zmask_loads_no_heavy_optional_libraries():
    code = "import sys, zmask, zmask.evaluation; print(sorted(m for m in ('sklearn', 'matplotlib', 'pycocotools') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_string_comparisons_of_task_or_preset_names():
    pattern = re.compile(r"task(\.name)? ?== ?\"|preset\.name ?==|hasattr\(.*objective")
    offenders = [f"{path}:{number}" for path in SRC.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_library_never_imports_the_command_line():
    offenders = [str(path) for path in (SRC / "zmask").rglob("*.py")
                 if "cli" not in path.relative_to(SRC / "zmask").parts and re.search(r"from \.+cli\b|import zmask\.cli|from zmask\.cli", path.read_text())]
    assert not offenders


def test_no_import_cycles():
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "import_cycles.py"
    if not tool.is_file():
        pytest.skip("the shared import-cycle tool is not beside this checkout")
    result = subprocess.run([sys.executable, str(tool), str(SRC)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_version_is_defined_once():
    import zmask
    from zmask._version import __version__

    assert zmask.__version__ == __version__
    pyproject = (SRC.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "zmask._version.__version__"' in pyproject
