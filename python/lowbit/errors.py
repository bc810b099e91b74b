"""Exception types raised by lowbit.

Every error that lowbit raises on purpose derives from ``LowbitError``, so callers can tell
"this input or setup is wrong" apart from a bug.
"""


class LowbitError(Exception):
    """Base class of every error that lowbit raises on purpose."""


class BackendUnavailableError(LowbitError, RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


class FormatError(LowbitError, ValueError):
    """A stored form is corrupted, truncated, or written by another format version."""
