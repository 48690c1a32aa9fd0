"""Exceptions that mean "the user gave us something wrong".

The CLI prints any :class:`UserError` as one line and exits non-zero (a traceback only with ``--debug``);
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: config, data path, checkpoint, CLI argument. The message is the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, malformed or out of range."""


class DataError(UserError):
    """A corpus is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class PreconditionError(UserError, ValueError):
    """An algorithm was called outside its mathematical preconditions (e.g. Krum with n < 2f + 3)."""


class NonFiniteError(UserError, ValueError):
    """A tensor that must be finite holds NaN or Inf."""
