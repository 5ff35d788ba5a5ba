"""Writing files safely: atomically (a temporary file in the same folder, then ``os.replace``), with
the modes the user's umask gives, and with one-line errors when the disk is full or a file-size
limit (``ulimit -f``) is hit.

``atomic_write(path, writer)`` is how zmask writes every file another process may read while it
runs or after it is killed (profiles, ``run.json``, patch sidecars): a reader sees the old file or
the new one, never half of one, and a failed write leaves the old file as it was. Standard library
only, so that the command line can use it before torch is imported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ZMaskError

#: The first line of a Markdown table that ``zmask table`` writes: how zmask recognises its own
#: file before replacing it (``--overwrite``).
TABLE_MARKER = "<!-- written by zmask table: regenerate, do not edit -->"

__all__ = ["FileWriteError", "atomic_write", "atomic_write_text", "creatable", "default_file_mode", "probe_writable"]


class FileWriteError(ZMaskError, OSError):
    """A file could not be written (full disk, file-size limit, permissions); the old file, if any,
    is unchanged."""


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _reason(error: BaseException) -> str:
    code = re.search(r"os error (\d+)", str(error))  # a Rust writer's (safetensors') report of an OSError
    if code and not isinstance(error, OSError):
        error = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return "the file is larger than the file-size limit (ulimit -f)"
    if isinstance(error, OSError) and error.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text


def _write_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a writer raises for an I/O failure: ``OSError``, and safetensors' own error
    (its Rust writer reports a full disk as ``SafetensorError``)."""
    kinds: list[type[BaseException]] = [OSError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(kinds)


def _missing_parents(folder: Path) -> list[Path]:
    """The folders above and including ``folder`` that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def atomic_write(path: str | Path, writer: Callable[[Path], object], *, fsync: bool = True, mode: int | None = None) -> Path:
    """Write ``path`` atomically: ``writer(temporary_path)`` writes the content to a temporary file
    in the same folder, which then replaces ``path`` in one step (``os.replace``).

    Missing parent folders are created (and removed again if the write fails). The new file gets
    ``mode``, by default the mode of the file it replaces or else what the umask gives (never the
    0600 of a bare temporary file). ``fsync``: flush the content to the disk before the rename (for
    files that must survive a power loss; not needed against a killed process). On a full disk, a
    file-size limit or another I/O error the temporary file is removed, ``path`` is left as it was,
    and ``FileWriteError`` says why in one line.
    """
    path = Path(path)
    folder, created, descriptor, temporary = _temporary_beside(path, ".tmp")
    os.close(descriptor)
    try:
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o7777
            except OSError:
                mode = default_file_mode()
        writer(temporary)
        os.chmod(temporary, mode)
        if fsync:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except _write_errors() as error:
        _discard(temporary)
        _remove_empty(created)
        raise FileWriteError(f"cannot write {path}: {_reason(error)}; {'the previous file is unchanged' if path.exists() else 'nothing was written'}") from None
    except BaseException:
        _discard(temporary)
        _remove_empty(created)
        raise
    if fsync:
        with contextlib.suppress(OSError):
            handle_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(handle_fd)
            finally:
                os.close(handle_fd)
    return path


def _temporary_beside(path: Path, suffix: str) -> tuple[Path, list[Path], int, Path]:
    """(folder, the parent folders created for it, descriptor, path) of a new hidden temporary file in
    ``path``'s folder; what was created is removed again and ``FileWriteError`` raised if it cannot be."""
    folder = path.parent if str(path.parent) else Path(".")
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=suffix)
    except OSError as error:
        _remove_empty(created)
        raise FileWriteError(f"cannot write {path}: {_reason(error)}") from None
    return folder, created, descriptor, Path(name)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), fsync=fsync)


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this module created, innermost first, where they are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def probe_writable(path: str | Path) -> None:
    """Check that ``path`` can be written the way :func:`atomic_write` writes it, by creating (and
    removing) a file in its folder now, so that a long computation does not end in a write error.

    Missing parent folders are created for the probe and removed again. Raises ``FileWriteError``
    naming the path and the reason (a read-only or virtual file system such as ``/proc``, a
    missing permission, a full disk).
    """
    path = Path(path)
    _, created, descriptor, name = _temporary_beside(path, ".probe")
    try:
        try:
            os.write(descriptor, b"z")
        finally:
            os.close(descriptor)
            _discard(name)
    except OSError as error:
        raise FileWriteError(f"cannot write {path}: {_reason(error)}") from None
    finally:
        _remove_empty(created)


@contextlib.contextmanager
def creatable(folder: str | Path) -> Iterator[list[Path]]:
    """Within the block, ``folder`` and its missing parents may be created; if the block fails they
    are removed again where still empty (no empty output folders are left after an error)."""
    created = _missing_parents(Path(folder))
    try:
        yield created
    except BaseException:
        _remove_empty(created)
        raise
