"""``zmask`` entry point: parse, apply the ``--config`` file, run the subcommand, report user errors.

User errors (``ZMaskError`` and ``OSError`` from the user's paths) become one line on stderr and
exit code 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import logging
import sys

import torch

from ..errors import UsageError, ZMaskError
from .checks import check_output_path
from .parser import OUTPUTS, _apply_config_file, build_parser

EXIT_USAGE = 2


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a message is logged."""

    @property  # type: ignore[override]
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        args = _apply_config_file(parser, args, argv)
        missing = [name for name in args.__dict__.pop("required_options") if getattr(args, name) in (None, [])]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise UsageError(f"{flags} must be given, on the command line or in the --config file")
        if args.command in OUTPUTS:
            check_output_path(getattr(args, "out", None), "--out", *OUTPUTS[args.command])
        if args.threads:
            torch.set_num_threads(args.threads)
        from . import commands

        return commands.COMMANDS[args.command](args) or 0
    except (ZMaskError, OSError) as error:
        if getattr(args, "debug", False):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"zmask {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("zmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
