"""The ``zmask`` command line and demo: an application on top of the library (which never imports it)."""

from .main import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
