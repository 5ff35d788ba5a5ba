"""Validation of command-line values: bounded counts, finite numbers, writable outputs.

The ``argparse`` types here are used by every count, size and threads option, and values from a
``--config`` file go through the same types (:func:`zmask.cli.parser._apply_config_file`), so a
negative count, zero repeats or a NaN learning rate is refused before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

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


def check_output_path(path: str | None, flag: str, folder: bool, suffix: str | None = None) -> Path | None:
    """Refuse an output path that cannot be written, before any work starts.

    ``folder``: the path is an output folder (created now if missing) rather than a file (whose
    folder must exist or be creatable and writable, and which must not be an existing folder);
    ``suffix``: the file's required suffix.
    """
    if path is None:
        return None
    if not str(path).strip():
        raise UsageError(f"{flag} is empty: give a {'folder' if folder else 'file'} path")
    target = Path(path)
    if folder:
        if target.exists() and not target.is_dir():
            raise UsageError(f"{flag} {target} exists and is not a folder")
        target.mkdir(parents=True, exist_ok=True)
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {target} is not writable")
        return target
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; give the path of the file to write (inside it, say)")
    if suffix is not None and target.suffix.lower() != suffix:
        raise UsageError(f"{flag} {target} must end with {suffix}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: its folder {parent} is not a writable folder")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {target} exists and is not writable")
    return target
