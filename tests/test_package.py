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


def test_no_bare_print_outside_the_command_line():
    """The library reports through ``logging``; only ``zmask.cli`` writes to stdout."""
    pattern = re.compile(r"(?<![\w.])print\(")
    offenders = [f"{path}:{number}" for path in (SRC / "zmask").rglob("*.py") if "cli" not in path.relative_to(SRC / "zmask").parts
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_every_package_has_a_module_logger():
    """Each subpackage of the library has at least one module logging through ``logging.getLogger(__name__)``."""
    packages = {path.parent for path in (SRC / "zmask").rglob("__init__.py")} - {SRC / "zmask" / "cli"}
    without = [str(package.relative_to(SRC)) for package in packages
               if not any("logging.getLogger(__name__)" in path.read_text() for path in package.glob("*.py"))]
    assert not without


def test_licence_file_matches_the_declared_licence():
    import tomllib

    root = SRC.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert declared["license"] == {"text": "MIT"} and "License :: OSI Approved :: MIT License" in declared["classifiers"]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert "GPL-3.0" in (root / "NOTICE").read_text() and "not distributed" in (root / "NOTICE").read_text()
    assert "## Unreleased" in (root / "CHANGELOG.md").read_text()


def test_wheel_ships_profiles_patches_and_py_typed(tmp_path):
    """A wheel built from the repository carries the shipped profiles (with the recorded hashes), the
    patches, ``py.typed`` and the licence files. Built from a copy, so the checkout gets no build/."""
    import hashlib
    import shutil
    import zipfile

    from zmask.models import PRESETS

    pytest.importorskip("setuptools", minversion="68", reason="building the wheel without network needs setuptools >= 68")
    pytest.importorskip("wheel", reason="building the wheel without network needs the wheel package")
    root = SRC.parent
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(root / name, source / name)
    shutil.copytree(SRC / "zmask", source / "src" / "zmask", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("zmask-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        records = [preset.profile_record for preset in PRESETS.values() if preset.profile_record is not None]
        assert records
        for record in records:
            member = f"zmask/profiles/{record.file}"
            assert member in names and hashlib.sha256(archive.read(member)).hexdigest() == record.sha256
        shipped_patches = {f"zmask/patches/{p.name}" for p in (SRC / "zmask" / "patches").iterdir()}
        assert shipped_patches <= names
        assert "zmask/py.typed" in names
        assert {n.rsplit("/", 1)[-1] for n in names if "/licenses/" in n} >= {"LICENSE", "NOTICE"}
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "Classifier: Programming Language :: Python :: 3.12" in metadata
