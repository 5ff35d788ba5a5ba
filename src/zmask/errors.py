"""Exception types raised by zmask.

All of them derive from the built-in ``ValueError``/``TypeError`` so that callers who do not know
zmask can still catch them; the command line turns them into one-line messages.
"""

from __future__ import annotations


class ZMaskError(ValueError):
    """A problem with input, configuration or state that the user can fix."""


class NotFittedError(ZMaskError):
    """A step that needs fitted statistics, fusion parameters or a threshold ran before fitting."""


class ProfileError(ZMaskError):
    """A profile file is unreadable, corrupted, or belongs to another model."""


class AssetError(ZMaskError):
    """A required asset (weights, data) is missing or does not match its recorded hash."""
