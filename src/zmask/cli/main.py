"""``zmask`` entry point: parse, apply the ``--config`` file, check the paths, run the subcommand,
report user errors.

Arguments and paths are checked before torch or the library is imported, so that ``--version``, a
typo or a missing file answers at once. User errors (``ZMaskError`` and ``OSError`` from the user's
paths) become one line on stderr and exit code 2; anything else is a bug and shows its traceback.
SIGINT (Ctrl-C) and SIGTERM end a command the same way: its outputs say ``interrupted``, and the
exit code is 128 + the signal number (130, 143).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from ..errors import UsageError, ZMaskError
from .checks import check_command_paths
from .parser import _apply_config_file, build_parser

EXIT_USAGE = 2


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (or SIGHUP): handled like Ctrl-C, with exit code 128 + the signal."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that ended the command (SIGINT: 130, SIGTERM: 143)."""
    return 128 + (interrupt.signal_number if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise :class:`Terminated` (a ``KeyboardInterrupt``)
    in the main thread, so that the command finishes its records as it does after Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(number: int, frame: object) -> None:
        raise Terminated(number)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, terminate)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cpus: int | None = None) -> int:
    """The default of ``--threads``: half the available cores (physical cores, where each has two
    hardware threads), 1 on a machine of up to 2 cores, so that zmask does not oversubscribe a
    small or shared machine (video decoding and encoding use one more thread)."""
    cpus = available_cpus() if cpus is None else cpus
    return 1 if cpus <= 2 else cpus // 2


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a message is logged."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(args) -> None:
    """The library's log messages (``logging.getLogger("zmask")``) on stderr: warnings, ``--verbose``
    adds info, ``--debug`` debug."""
    level = logging.DEBUG if args.debug else logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logger = logging.getLogger("zmask")
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"zmask {args.command}: %(levelname)s: %(message)s"))


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    previous_threads = None
    try:
        args = _apply_config_file(parser, args, argv)
        missing = [name for name in args.__dict__.pop("required_options") if getattr(args, name) in (None, [])]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise UsageError(f"{flags} must be given, on the command line or in the --config file")
        check_command_paths(args)
        import torch  # only now: every check above answers without it

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads or default_threads())
        from . import commands

        with signals_as_interrupts():
            return commands.COMMANDS[args.command](args) or 0
    except (ZMaskError, OSError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"zmask {args.command}: error: {_first_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        print(f"zmask {args.command}: {'terminated' if isinstance(interrupt, Terminated) else 'interrupted'}", file=sys.stderr)
        return exit_code_of(interrupt)
    finally:
        if previous_threads is not None:
            sys.modules["torch"].set_num_threads(previous_threads)


if __name__ == "__main__":
    raise SystemExit(main())
