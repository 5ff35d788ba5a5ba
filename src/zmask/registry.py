"""Registries: names -> builders, in the style of torchvision's ``register_model``.

A model preset, a task, a defense or an attack becomes available everywhere (the API, the command
line, the reports) by registering itself in its registry; nothing is looked up by comparing name
strings elsewhere::

    from zmask.evaluation import DEFENSES

    @DEFENSES.register("my_baseline")
    class MyBaseline: ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ZMaskError

T = TypeVar("T")


class UnknownNameError(ZMaskError, KeyError):
    """A name that no registry entry carries."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in messages: "model preset", "defense")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator adding an entry under ``name`` (default: the entry's ``name`` attribute)."""

        def add(entry: T) -> T:
            key = name if name is not None else getattr(entry, "name", None)
            if not isinstance(key, str) or not key:
                raise ZMaskError(f"a {self.kind} needs a non-empty string name to be registered")
            if key in self._entries and not replace and self._entries[key] is not entry:
                raise ZMaskError(f"a {self.kind} named {key!r} is already registered; pass replace=True to override it")
            self._entries[key] = entry
            return entry

        return add

    def add(self, entry: T, name: str | None = None, *, replace: bool = False) -> T:
        """Register ``entry`` (non-decorator form)."""
        return self.register(name, replace=replace)(entry)

    def remove(self, name: str) -> None:
        """Forget an entry (tests that register temporary ones clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises with the close matches and the choices."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (available: {', '.join(self.names()) or 'none'})")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
