"""Validation of command-line values: bounded counts, finite numbers, writable outputs.

The ``argparse`` types here are used by every count, size and threads option, and values from a
``--config`` file go through the same types (:func:`zmask.cli.parser._apply_config_file`), so a
negative count, zero repeats or a NaN learning rate is refused before any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import UsageError


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer in [low, high] (``type=bounded_int(1, 64)``)."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value}")
        return value

    parse.__name__ = f"an integer in [{low}, {high}]"
    return parse


def positive_int(maximum: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer in [1, maximum]."""
    return bounded_int(1, maximum)


def finite_float(text: str) -> float:
    """An ``argparse`` type: a finite number (NaN and +-inf refused)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


finite_float.__name__ = "a finite number"


def probability(text: str) -> float:
    """An ``argparse`` type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


probability.__name__ = "a number in [0, 1]"

# Bounds of the count options: generous, but finite, so that a typo cannot ask for years of work.
MAX_IMAGES = 1_000_000
MAX_THREADS = 1024
MAX_BATCH = 4096
MAX_STEPS = 1_000_000
MAX_EPOCHS = 100_000
MAX_REPEATS = 1000
MAX_PLACEMENTS = 1000
MAX_FRAMES = 100_000
MAX_SEED = 2**32 - 1
MAX_SIDE = 16384  # pixels of an input height or width
MAX_RESAMPLES = 100_000  # bootstrap resamples: zmask.evaluation.uncertainty.MAX_RESAMPLES (a test keeps them equal)


RUN_RECORD = "run.json"
PROFILE_FORMAT = "zmask-profile"  # zmask.core.profile.FORMAT_NAME, read here without importing torch
MAX_HEADER_PEEK = 1024 * 1024


def zmask_run_record(folder: Path) -> dict[str, Any] | None:
    """The ``run.json`` that zmask wrote into ``folder`` (a JSON object naming the command and the
    zmask version), or ``None`` when there is none or it is not zmask's."""
    record = folder / RUN_RECORD
    try:
        if not record.is_file() or record.stat().st_size > MAX_HEADER_PEEK:
            return None
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) and "zmask_version" in data else None


def is_zmask_profile(path: Path) -> bool:
    """Whether ``path`` is a file zmask wrote as a profile (its safetensors header says so)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return False
            size = int.from_bytes(head, "little")
            if size > MAX_HEADER_PEEK:
                return False
            header = json.loads(handle.read(size))
    except (OSError, ValueError, RecursionError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("format") == PROFILE_FORMAT


def is_zmask_patch_sidecar(path: Path) -> bool:
    """Whether ``path`` is the JSON sidecar zmask writes beside a patch PNG (``zmask attack``, the
    committed patches): a JSON object with the patch's height and width and the model or writer."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_HEADER_PEEK:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(data, dict) and {"height", "width"} <= set(data)
            and (str(data.get("written_by", "")).startswith("zmask") or "model" in data))


def _same_or_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def check_empty_text(path: str | None, flag: str, what: str) -> None:
    if path is not None and not str(path).strip():
        raise UsageError(f"{flag} is empty: give a {what} path")


def check_output_folder(path: str, flag: str, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output folder that would replace files zmask did not write, before any work starts.

    The folder may be new (it is created only when the first output is written), empty, or hold
    the ``run.json`` of an earlier zmask run, whose outputs are replaced only with ``--overwrite``.
    A folder with other files is refused, with or without ``--overwrite``. No input (file or
    folder) may lie inside it, so that no output can replace an input.
    """
    check_empty_text(path, flag, "folder")
    target = Path(path)
    for source in inputs:
        if _same_or_inside(Path(source), target):
            raise UsageError(f"{flag} {target} holds the input {source}: outputs never replace inputs; choose an output folder "
                             "that holds no input")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UsageError(f"{flag} {target} exists and is not a folder")
        try:
            entries = next(iter(target.iterdir()), None)
        except OSError as error:
            raise UsageError(f"{flag} {target} cannot be read: {error.strerror or error}") from None
        if entries is not None:
            record = zmask_run_record(target)
            if record is None:
                raise UsageError(f"{flag} {target} is a folder with files that zmask did not write (it has no zmask {RUN_RECORD}); "
                                 "choose a new or empty folder")
            if not overwrite:
                raise UsageError(f"{flag} {target} holds the outputs of an earlier `zmask {record['command']}` run; "
                                 "give --overwrite to replace them, or choose a new folder")
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {target} is not writable")
        return target
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: its folder {parent} is not a writable folder")
    return target


def check_output_file(path: str, flag: str, suffix: str, overwrite: bool, owned: Callable[[Path], bool], what: str,
                      inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output file that is not new or zmask's own, or cannot be written, before any work starts.

    ``suffix``: the required suffix (``.safetensors``, ``.png``); ``owned(path)``: whether an
    existing file is one zmask wrote (``what`` names such a file in messages). An existing file of
    zmask's is replaced only with ``--overwrite``; any other existing file is refused. The file must
    not be one of ``inputs``. Writability is checked by creating a file in its folder now
    (:func:`zmask.fileio.probe_writable`).
    """
    from ..fileio import FileWriteError, probe_writable

    check_empty_text(path, flag, "file")
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; give the path of the {what} to write (inside it, say)")
    if target.suffix.lower() != suffix:
        raise UsageError(f"{flag} {target} must end with {suffix} (it is a {what})")
    for source in map(Path, inputs):
        if source.resolve() == target.resolve() or (source.exists() and target.exists() and os.path.samefile(source, target)):
            raise UsageError(f"{flag} {target} is also an input ({source}): outputs never replace inputs; choose another path")
    if target.exists() or target.is_symlink():
        if not owned(target):
            raise UsageError(f"{flag} {target} exists and is not a {what} written by zmask; choose another path")
        if not overwrite:
            raise UsageError(f"{flag} {target} exists (a {what} written by zmask); give --overwrite to replace it, or choose another path")
        if not os.access(target, os.W_OK):
            raise UsageError(f"{flag} {target} exists and is not writable")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: its folder {parent} is not a writable folder")
    try:
        probe_writable(target)
    except FileWriteError as error:
        raise UsageError(f"{flag} {target} cannot be written: {str(error).split(': ', 1)[-1]}") from None
    return target


def check_patch_output(path: str, flag: str, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """``attack --out``: a ``.png`` that is new or a zmask patch (one with zmask's sidecar), and a
    sidecar path (``<name>.json``) that is free or zmask's own, never an unrelated JSON file."""
    check_empty_text(path, flag, "file")
    target = Path(path)
    sidecar = target.with_suffix(".json") if target.name else target
    if target.suffix.lower() == ".png" and sidecar.exists() and not is_zmask_patch_sidecar(sidecar):
        raise UsageError(f"{flag} {target}: its sidecar {sidecar} exists and was not written by zmask; "
                         "choose another name for the patch")
    target = check_output_file(path, flag, ".png", overwrite, lambda png: is_zmask_patch_sidecar(png.with_suffix(".json")),
                               "patch PNG (with its zmask JSON sidecar)", inputs)
    if sidecar.exists() and not overwrite:
        raise UsageError(f"{flag} {target}: its sidecar {sidecar} exists (written by zmask); give --overwrite to replace it")
    return target


def _is_zmask_table(path: Path) -> bool:
    """Whether ``path`` is a table ``zmask table`` wrote (its first line is the marker)."""
    from ..fileio import TABLE_MARKER

    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().strip() == TABLE_MARKER
    except (OSError, UnicodeDecodeError):
        return False


def check_input_paths(paths: Iterable[str], what: str) -> None:
    """Each input path exists (checked before torch is imported: a typo answers at once)."""
    for entry in paths:
        if not str(entry).strip():
            raise UsageError(f"{'an' if what[:1] in 'aeiou' else 'a'} {what} path is empty")
        if not Path(entry).exists():
            raise UsageError(f"{what} {entry} does not exist")


def _patch_files(args: argparse.Namespace) -> list[str]:
    """The patch PNGs ``evaluate`` reads (``NAME=PNG`` entries; malformed ones are reported later)."""
    entries = [*getattr(args, "patch", []), *getattr(args, "beta_patch", []), *getattr(args, "alpha_patch", [])]
    return [entry.split("=", 1)[1] for entry in entries if "=" in entry]


def default_demo_folder() -> Path:
    """``zmask demo``'s output folder when ``--out`` is not given: a new ``demo/<date-time>`` folder
    in the user cache (``$ZMASK_CACHE`` or ``~/.cache/zmask``), never inside a source checkout."""
    import time

    from ..assets import cache_folder

    base = cache_folder() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    folder, count = base, 1
    while folder.exists():
        count += 1
        folder = base.with_name(f"{base.name}-{count}")
    return folder


#: The commands whose --out is a file: (suffix, what it is).
OUTPUT_FILES = {"fit": (".safetensors", "profile"), "attack": (".png", "patch PNG"), "table": (".md", "Markdown table")}


def check_command_paths(args: argparse.Namespace) -> None:
    """The paths of a command, checked before any model is built or torch imported: inputs exist,
    outputs are new or zmask's own (``--overwrite`` to replace those) and never an input, output
    files carry their suffix and can be created."""
    command, overwrite = args.command, bool(getattr(args, "overwrite", False))
    profile = [args.profile] if getattr(args, "profile", None) else []
    out = getattr(args, "out", None)
    if out is not None:  # the output's form first: empty, a folder where a file belongs, the suffix
        check_empty_text(out, "--out", "folder" if command in ("defend", "evaluate", "demo") else "file")
        if command in OUTPUT_FILES:
            if Path(out).is_dir():
                raise UsageError(f"--out {out} is a folder; give the path of the file to write (inside it, say)")
            suffix, what = OUTPUT_FILES[command]
            if Path(out).suffix.lower() != suffix:
                raise UsageError(f"--out {out} must end with {suffix} (it is a {what})")
        elif Path(out).exists() and not Path(out).is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
    if command == "defend":
        check_input_paths(args.inputs, "input")
        check_input_paths(profile, "profile")
        check_output_folder(args.out, "--out", overwrite, [*args.inputs, *profile])
    elif command == "evaluate":
        check_input_paths(profile, "profile")
        check_input_paths(_patch_files(args), "patch")
        if os.environ.get("RANK", "0").strip() in ("", "0"):  # under torchrun only rank 0 writes (and may find its own run.json)
            check_output_folder(args.out, "--out", overwrite, [*profile, *_patch_files(args)])
    elif command == "demo":
        if args.out is None:
            args.out = str(default_demo_folder())
        check_output_folder(args.out, "--out", overwrite)
    elif command == "fit":
        check_input_paths(args.patches, "patch")
        check_output_file(args.out, "--out", ".safetensors", overwrite, is_zmask_profile, "profile", args.patches)
        if Path(args.out + ".run").exists():  # the fit's run record folder beside the profile
            check_output_folder(args.out + ".run", "--out (its run record)", True)
    elif command == "table":
        folders = []
        for entry in args.report:
            name, sign, folder = entry.partition("=")
            if not sign or not name or not folder:
                raise UsageError(f"--report {entry!r}: give PRESET=FOLDER (the folder of that preset's zmask evaluate report)")
            folders.append(str(Path(folder) / "results.json"))
        check_input_paths(folders, "report")
        check_output_file(args.out, "--out", ".md", overwrite, _is_zmask_table, "table", folders)
    elif command == "attack":
        inputs = [p for p in (args.resume, getattr(args, "profile", None)) if p]
        check_input_paths(inputs, "input")
        check_patch_output(args.out, "--out", overwrite, inputs)
