"""Atomic writes (zmask.fileio): a full disk or a file-size limit is a one-line error and leaves the
old file intact, new files get the umask's mode, and writability is probed before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zmask.fileio import FileWriteError, atomic_write, atomic_write_text, default_file_mode, probe_writable


def test_atomic_write_replaces_and_keeps_modes(tmp_path):
    previous = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
        target = tmp_path / "new" / "deeper" / "record.json"
        atomic_write_text(target, "one")
        assert target.read_text() == "one" and target.stat().st_mode & 0o777 == 0o640
        os.chmod(target, 0o604)
        atomic_write_text(target, "two")
        assert target.read_text() == "two" and target.stat().st_mode & 0o777 == 0o604  # a replaced file keeps its mode
        assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]  # no temporary file left
    finally:
        os.umask(previous)


def test_a_safetensors_file_gets_the_umask_mode_not_0600(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "p.safetensors", lambda temporary: save_file({"x": torch.zeros(3)}, str(temporary)))
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_a_failing_writer_leaves_the_old_file_and_no_folder(tmp_path):
    target = tmp_path / "profile.safetensors"
    target.write_bytes(b"old profile")

    def half_then_full(temporary: Path) -> None:
        temporary.write_bytes(b"half of a new")
        raise OSError(28, "No space left on device")

    with pytest.raises(FileWriteError, match="no space left on the device; the previous file is unchanged"):
        atomic_write(target, half_then_full)
    assert target.read_bytes() == b"old profile" and sorted(p.name for p in tmp_path.iterdir()) == ["profile.safetensors"]
    with pytest.raises(FileWriteError, match="nothing was written"):
        atomic_write(tmp_path / "a" / "b" / "new.bin", half_then_full)
    assert not (tmp_path / "a").exists()  # folders made for the write are removed again
    with pytest.raises(KeyError):  # a bug in the writer is not turned into a user error
        atomic_write(target, lambda temporary: {}["missing"])
    assert target.read_bytes() == b"old profile"


SAVE_UNDER_LIMIT = """
import resource, sys, torch
from safetensors.torch import save_file
from zmask.fileio import FileWriteError, atomic_write
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))   # ulimit -f 4
try:
    atomic_write(sys.argv[1], lambda temporary: save_file({"x": torch.zeros(100_000)}, str(temporary)))
except FileWriteError as error:
    print(error)
    sys.exit(2)
"""


def test_file_size_limit_is_a_one_line_error(tmp_path):
    pytest.importorskip("torch")
    target = tmp_path / "profile.safetensors"
    target.write_bytes(b"old profile")
    result = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == f"cannot write {target}: the file is larger than the file-size limit (ulimit -f); the previous file is unchanged"
    assert len(result.stdout.strip().splitlines()) == 1
    assert target.read_bytes() == b"old profile" and sorted(p.name for p in tmp_path.iterdir()) == ["profile.safetensors"]


def test_probe_writable(tmp_path):
    probe_writable(tmp_path / "x" / "y" / "p.safetensors")
    assert list(tmp_path.iterdir()) == []  # the probe's file and folders are gone
    for place in ("/proc/zmask.safetensors", "/proc/self/none/p.safetensors"):
        with pytest.raises(FileWriteError, match="cannot write"):
            probe_writable(place)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileWriteError):
        probe_writable(tmp_path / "file" / "p.safetensors")
