"""Interrupted runs leave consistent outputs: after SIGTERM (handled like Ctrl-C) and even after
SIGKILL, the defended video decodes, every frame in it has its JSON line, and run.json says what
was processed. And the command line answers usage errors before torch is imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[2]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPOSITORY / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """60 frames at 5 frames/s: one-second fragments of 5 frames in the defended video."""
    from zmask.data.video import write_video

    path = tmp_path_factory.mktemp("interrupts") / "clip.mp4"
    write_video(path, [torch.rand(3, 72, 96, generator=torch.Generator().manual_seed(i)) for i in range(60)], fps=5)
    return path


def _start_defend(clip: Path, profile: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "zmask.cli", "defend", str(clip), "--model", "espnet_camvid", "--profile", str(profile),
               "--out", str(out), "--no-progress", "--threads", "1"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT, cwd=out.parent)


def _wait_for_lines(process: subprocess.Popen, results: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"zmask defend ended early ({process.returncode}): {process.stderr.read()[-2000:]}")
        if results.is_file() and results.read_text().count("\n") >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} lines in {results} after {timeout} s")


def _lines(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()]


def test_kill_9_midway_leaves_a_playable_video_with_lines_for_its_frames(clip, profile, tmp_path):
    from zmask.data.video import open_frames

    out = tmp_path / "killed"
    process = _start_defend(clip, profile, out)
    _wait_for_lines(process, out / "results.jsonl", 14)
    time.sleep(1.1)  # run.json is rewritten at least every second
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    lines = _lines(out / "results.jsonl")
    assert [line["frame"] for line in lines] == list(range(len(lines))) and 14 <= len(lines) < 60
    decoded = list(open_frames(out / "videos" / "clip.mp4"))
    assert 5 <= len(decoded) <= len(lines)  # every frame in the video has its line
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running" and record["processed"] == []
    current = record["current"]
    assert current["input"] == str(clip) and current["output"] == "videos/clip.mp4"
    assert 1 <= current["frames_processed"] <= len(lines)


def test_sigterm_is_handled_like_ctrl_c(clip, profile, tmp_path):
    from zmask.data.video import open_frames

    out = tmp_path / "terminated"
    process = _start_defend(clip, profile, out)
    _wait_for_lines(process, out / "results.jsonl", 3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert "terminated" in process.stderr.read()
    lines = _lines(out / "results.jsonl")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["processed"] == []
    assert record["current"] == {"input": str(clip), "output": "videos/clip.mp4", "frames_processed": len(lines)}
    decoded = list(open_frames(out / "videos" / "clip.mp4"))  # the video was closed properly
    assert len(lines) - 1 <= len(decoded) <= len(lines) and len(lines) >= 3  # a frame may be stopped between its line and its encoding


# ---------------------------------------------------------------------------- start-up
def _timed(*argv: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "zmask.cli", *argv], capture_output=True, text=True, env=ENVIRONMENT, timeout=120)
    return time.perf_counter() - started, result


def test_version_and_usage_errors_answer_before_torch_is_imported(tmp_path):
    seconds, result = _timed("--version")
    assert result.returncode == 0 and result.stdout.startswith("zmask ") and seconds < 3, seconds
    seconds, result = _timed("defend", str(tmp_path / "nope.png"), "--model", "espnet_camvid", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "nope.png does not exist" in result.stderr and seconds < 3, (seconds, result.stderr)
    seconds, result = _timed("defend", "nope.png", "--model", "espnet_camvid")
    assert result.returncode == 2 and "--out must be given" in result.stderr and seconds < 3, (seconds, result.stderr)
    assert not (tmp_path / "out").exists()
    code = "import sys, zmask.cli, zmask.cli.parser, zmask.cli.main; zmask.cli.build_parser(); print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENVIRONMENT, check=True)
    assert imported.stdout.strip() == "False"


def test_default_threads_leave_a_small_machine_room():
    from zmask.cli.main import default_threads

    assert [default_threads(cpus) for cpus in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]


def test_help_names_the_registered_entries():
    """The parser names the built-in tasks, defenses and objectives without importing them: the
    lists it uses are those of the registries."""
    from zmask.attacks import ADAPTIVE_OBJECTIVES
    from zmask.cli import parser
    from zmask.cli.checks import MAX_RESAMPLES
    from zmask.evaluation import DEFENSES
    from zmask.evaluation.uncertainty import MAX_RESAMPLES as LIBRARY_MAX_RESAMPLES
    from zmask.tasks import TASKS

    assert {name: TASKS.get(name).objectives for name in TASKS.names()} == parser.BUILTIN_TASK_OBJECTIVES
    assert tuple(DEFENSES.names()) == parser.BUILTIN_DEFENSES
    assert tuple(ADAPTIVE_OBJECTIVES.names()) == parser.BUILTIN_ADAPTIVE_OBJECTIVES
    assert MAX_RESAMPLES == LIBRARY_MAX_RESAMPLES


def test_lazy_package_names_all_resolve():
    import zmask

    assert all(getattr(zmask, name) is not None for name in zmask.__all__)
    from zmask import ZMask  # noqa: F401 - the documented import still works
