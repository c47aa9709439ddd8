"""The error a person can fix by asking differently, shared by the library and the CLI."""

from __future__ import annotations


class UsageError(ValueError):
    """A request refused because of what was asked: an argument outside what is allowed, options
    that do not go together, a model or dataset the asked-for method cannot take. The message
    names the bad value and what is allowed.

    The CLI reports it (with the project's other user-facing errors: ConfigError, DataError,
    RunDirError, CheckpointError, DamagedFileError, TensorboardUnavailable) in one line and exits 2;
    any other exception that escapes a command is a bug and keeps its traceback. A ValueError, so
    that library callers catch it as any bad argument.
    """
