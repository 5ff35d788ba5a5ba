"""Exception types raised by zmask.

Every error a user can fix derives from :class:`ZMaskError`, itself a ``ValueError`` so that
callers who do not know zmask can still catch it; wrong types are also ``TypeError``. The command
line turns ``ZMaskError`` (and ``OSError`` from the user's paths) into one-line messages and lets
anything else, a bug, show its traceback.
"""

from __future__ import annotations


class ZMaskError(ValueError):
    """A problem with input, configuration or state that the user can fix."""


class ZMaskTypeError(ZMaskError, TypeError):
    """An argument of the wrong type (a list where a tensor belongs, a string where a number does)."""


class ConfigError(ZMaskError):
    """An inconsistent or out-of-range setting (configuration, training or attack settings)."""


class InputError(ZMaskError):
    """Input data (images, masks, batches, layer outputs) that the defense cannot process."""


class NotFittedError(ZMaskError):
    """A step that needs fitted statistics, fusion parameters or a threshold ran before fitting."""


class ProfileError(ZMaskError):
    """A profile file is unreadable, corrupted, or belongs to another model."""


class AssetError(ZMaskError):
    """A required asset (weights, data) is missing or does not match its recorded hash."""


class UsageError(ZMaskError):
    """A command-line usage problem: a missing option, a malformed value, a bad output path."""
