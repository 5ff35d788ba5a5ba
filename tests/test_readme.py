"""Every code block of README.md and of the pages under docs/, extracted and run as a user would.

``python`` blocks are executed in a fresh namespace, ``bash`` blocks through bash with ``zmask`` on the
PATH, both in a scratch folder that mirrors the repository root (links to its files, so that the
README's relative paths resolve while everything the blocks write lands in the scratch folder),
with ``ZMASK_ASSETS`` set. ``text`` blocks are output and are not run. A block preceded by
``<!-- readme-test: skip (reason) -->`` is not run: only the install and test commands may be
marked so (the test suite cannot install or run itself), which the tests below check.

Slow commands run at small sizes: :data:`SMALL_SIZES` maps an exact command line of the README
(its trailing comment left out) to flags appended to it; command-line flags win over a
``--config`` file. The README says so next to each such block.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The documents whose blocks run: the README and the site's pages (the reports under docs/results are output).
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash"}
SHOWN = {"text"}
SKIP_MARK = "<!-- readme-test: skip"

_ESPNET_L = "src/zmask/patches/espnet_camvid_L_beta1.0.png"
_YOLO_L = "src/zmask/patches/yolov5n_coco_L.png"
_FIT_SMALL = "--statistics-images 2 --fusion-images 2 --calibration-images 6 --placements 1 --epochs 1 --no-progress"
_EVALUATE_SMALL = "--limit 1 --train-images 2 --defenses zmask none --no-progress"

#: README command line -> flags the test appends (small sizes; outputs inside the scratch folder).
SMALL_SIZES: dict[str, str] = {
    "zmask demo": "--quick --no-progress --out demo --overwrite",  # README and docs/cli.md both run it in one scratch folder
    "zmask fit --config experiments/espnet_camvid_fit.yaml": f"--out espnet_camvid.safetensors {_FIT_SMALL}",
    "zmask evaluate --config experiments/espnet_camvid.yaml": (
        f"--profile espnet_camvid.safetensors --out reports/espnet_camvid {_EVALUATE_SMALL} --patch L={_ESPNET_L} "
        f"--beta-patch 1.0={_ESPNET_L} --alpha-patch mask:1.0={_ESPNET_L}"),
    "zmask fit --config experiments/yolov5n_coco_fit.yaml": f"--out yolov5n_coco.safetensors {_FIT_SMALL}",
    "zmask evaluate --config experiments/yolov5n_coco.yaml": (
        f"--profile yolov5n_coco.safetensors --out reports/yolov5n_coco {_EVALUATE_SMALL} --patch L={_YOLO_L} "
        f"--beta-patch 1.0={_YOLO_L} --alpha-patch mask:1.0={_YOLO_L}"),
}

#: The only command lines a skipped block may hold: installs, and the README's test command.
INSTALL_OR_TEST = re.compile(r"^(pip install .+|ZMASK_ASSETS=\S+ python -m pytest)$")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    skip_reason: str | None
    source: str = "README.md"

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}-{self.language or 'none'}"

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def readme_blocks(text: str, source: str = "README.md") -> list[Block]:
    """The fenced blocks of a Markdown text, with the skip mark of the line before each (if any)."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[index])
        if not match:
            index += 1
            continue
        start = index
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```"), None)
        assert end is not None, f"{source}:{start + 1}: unclosed code fence"
        previous = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        reason = previous[len(SKIP_MARK):].strip(" ->") if previous.startswith(SKIP_MARK) else None
        blocks.append(Block(match.group(1), "\n".join(lines[start + 1 : end]) + "\n", start + 1, reason, source))
        index = end + 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in readme_blocks(document.read_text(), str(document.relative_to(ROOT)))]
RUNNABLE = [block for block in BLOCKS if block.language in RUN and block.skip_reason is None]


def command_lines(code: str) -> list[str]:
    """Shell command lines without trailing comments (a backslash continuation joins lines)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [_command(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _command(line: str) -> str:
    """A command line without its trailing comment, whitespace collapsed."""
    return " ".join(re.sub(r"\s+#.*$", "", line).split())


def with_small_sizes(code: str) -> str:
    """The block with the flags of :data:`SMALL_SIZES` appended to the command lines it names."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        command = _command(line)
        out.append(f"{command} {SMALL_SIZES[command]}" if command in SMALL_SIZES else line)
    return "\n".join(out) + "\n"


def test_block_extraction_skip_marks_and_small_sizes():
    text = ("intro\n\n<!-- readme-test: skip (install) -->\n```bash\npip install x\n```\n\n```\nbare\n```\n"
            "```bash\nzmask demo                # comment\nzmask fit \\\n    --x 1\n```\n")
    blocks = readme_blocks(text)
    assert [(b.language, b.line, b.skip_reason) for b in blocks] == [("bash", 4, "(install)"), ("", 8, None), ("bash", 11, None)]
    assert command_lines(blocks[2].code) == ["zmask demo", "zmask fit --x 1"]
    assert with_small_sizes(blocks[2].code).splitlines()[0] == f"zmask demo {SMALL_SIZES['zmask demo']}"


def test_every_block_is_run_shown_or_an_install_or_test_command():
    assert RUNNABLE and any(block.language == "python" for block in RUNNABLE)
    for block in BLOCKS:
        assert block.language in RUN | SHOWN, f"{block.where}: fence language {block.language!r}; use python, bash or text"
        assert block.skip_reason is None or block.language == "bash", f"{block.where}: only install/test commands may be skipped"
    skipped = [block for block in BLOCKS if block.skip_reason is not None]
    assert skipped, "the install and test commands are marked as skipped"
    ci_run = (ROOT / ".ci" / "run").read_text()
    for block in skipped:
        for line in command_lines(block.code):
            assert INSTALL_OR_TEST.match(line), f"{block.where}: {line!r} is skipped but is no install or test command"
    first = command_lines(skipped[0].code)
    assert first[0] == "pip install -e '.[test]'" and f"pip install -e '.[test]'" in ci_run
    assert first[1].endswith(" python -m pytest") and "-m pytest" in ci_run  # the commands CI runs


def test_every_small_size_entry_names_a_readme_command():
    commands = {line for block in RUNNABLE if block.language == "bash" for line in command_lines(block.code)}
    assert set(SMALL_SIZES) <= commands, sorted(set(SMALL_SIZES) - commands)


def _digest(folders: list[Path]) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for folder in folders if folder.is_dir()
            for path in sorted(folder.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, assets) -> Path:
    """``<tmp>/repo`` links every top-level entry of the repository; ``<tmp>/shared/assets`` the assets
    (so ``../shared/assets`` resolves from it as from a checkout beside shared/)."""
    base = tmp_path_factory.mktemp("readme")
    (base / "shared").mkdir()
    (base / "shared" / "assets").symlink_to(assets.resolve(), target_is_directory=True)
    repo = base / "repo"
    repo.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "build", "reports", "zmask-demo"} and not entry.name.endswith(".egg-info"):
            (repo / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return repo


def _environment(assets: Path) -> dict[str, str]:
    executable = shutil.which("zmask")
    assert executable is not None, "pip install -e . must install the zmask console script"
    env = dict(os.environ, ZMASK_ASSETS=str(assets.resolve()), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join([str(Path(executable).parent), str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run_python(block: Block, scratch: Path, assets: Path, monkeypatch) -> None:
    """Exec the block in a fresh namespace, from the scratch folder, on one thread (this process has
    torch and zmask imported already: a fresh interpreter would spend seconds importing them)."""
    import torch

    monkeypatch.chdir(scratch)
    monkeypatch.setenv("ZMASK_ASSETS", str(assets.resolve()))
    import numpy as np

    threads, numpy_state = torch.get_num_threads(), np.random.get_state()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the block's seeds do not leak into later tests
            exec(compile(block.code, block.where, "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
        np.random.set_state(numpy_state)


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_readme_block_runs(block: Block, scratch: Path, assets: Path, monkeypatch, capsys):
    guarded = [ROOT / "src" / "zmask" / "profiles", ROOT / "src" / "zmask" / "patches", ROOT / "experiments"]
    before = _digest(guarded)
    if block.language == "python":
        _run_python(block, scratch, assets, monkeypatch)
    else:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", with_small_sizes(block.code)], cwd=scratch, env=_environment(assets),
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{block.where} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert _digest(guarded) == before, f"{block.where} changed files of the repository"
